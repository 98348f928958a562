"""lorawarm's benchmarks: plain scripts, one command each (`python -m bench.<name>`).

Results, with the commands that produced them, are in `bench/RESULTS.md`. Run them with the
vLLM lock held (`flock /tmp/lorawarm-vllm.lock python -m bench.<name>`): the machines are small
and a second vLLM on the same cores makes every figure meaningless.
"""
