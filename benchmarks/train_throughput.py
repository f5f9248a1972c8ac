"""Training throughput of BF16 vs torchao tensorwise vs hf_fp8 on one device: a thin wrapper of
`hf_fp8.bench` (also `hf-fp8 bench`); see there for what is timed.

  python benchmarks/train_throughput.py --shape 1.5b --modes bf16,torchao,hf_fp8,hf_fp8_attn --out results/train_throughput.json
"""

from hf_fp8.bench import main

if __name__ == "__main__":
    main()
