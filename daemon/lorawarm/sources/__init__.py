"""Sources: adapters kept in object storage (S3 and S3-compatible stores).

    bucket ──listing──▶ plan (new / changed / removed / conflict) ──download──▶ staging
           ──rename──▶ drop directory (like a user's `cp` + `mv`) ──▶ intake, unchanged

The sync stage (`sync.SourceSync`, daemon side) and the on-demand fetch (`fetch.Fetcher`, used
by the vLLM plugin) share one download-and-publish path (`fetch.fetch_adapter`), one
per-adapter manifest under `<state>/sources/` (`manifest`), and one per-name file lock, so the
two processes never publish the same name at once. Nothing here calls the intake or the
catalog: the drop directory is the only interface, as it is for a user.

Modules: `location` (parsing `s3://bucket/prefix/`), `bucket` (the boto3 client: listing,
streaming downloads, what an error means), `manifest` (what was synced, by whom), `publish`
(staging, rename, removal), `fetch`, `sync`.
"""
