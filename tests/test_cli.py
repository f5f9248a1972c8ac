"""The `hf-fp8` command line: `train` (in-process and through the installed console script),
`inspect` on config files and model directories, and its errors for bad input.

Training runs are tiny (a few steps of a few 32-token sequences) so the whole file stays fast."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fp8 import _data
from hf_fp8.cli import main

# A few steps of the default model; enough for the loss to fall from its random-init value.
TINY_TRAIN = ["train", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--log-every", "3"]

LLAMA_CONFIG = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 200,  # not a multiple of 16: the MLP linears must stay in high precision
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 2, "n_positions": 128}


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def check_train_results(results: dict) -> None:
    """Both runs trained to finite losses, and the FP8 loss went down."""
    assert set(results["runs"]) == {"fp8", "bf16"}
    for name, run in results["runs"].items():
        for key in ("final_train_loss", "eval_loss", "tokens_per_s"):
            assert math.isfinite(run[key]), (name, key, run[key])
        assert all(math.isfinite(loss) for loss in run["losses"]), (name, run["losses"])
    fp8_losses = results["runs"]["fp8"]["losses"]
    assert fp8_losses[-1] < fp8_losses[0], fp8_losses
    assert results["runs"]["fp8"]["fp8_layers"] > 0
    assert set(results["fp8_over_baseline"]) == {"final_train_loss", "eval_loss", "tokens_per_s"}


def test_train_in_process_with_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("amax_history_len: 16\nmargin: 1\n")
    output = tmp_path / "results.json"

    assert main(TINY_TRAIN + ["--recipe", str(recipe), "--output-json", str(output)]) == 0

    printed = capsys.readouterr().out
    assert "hf_fp8 coverage:" in printed  # the FP8 report, printed before training
    assert "history=16" in printed and "margin=1" in printed  # ... of the recipe from the file
    assert "[fp8] step     3/6" in printed and "[bf16] step     6/6" in printed  # loss every --log-every steps
    assert "FP8 vs BF16" in printed and "fp8/bf16" in printed and "eval loss (held-out)" in printed
    results = json.loads(output.read_text())
    check_train_results(results)
    assert results["settings"]["recipe"]["amax_history_len"] == 16
    # Same init and same batches: the two runs start from the same loss (only the GEMM precision differs).
    first_fp8, first_bf16 = results["runs"]["fp8"]["losses"][0], results["runs"]["bf16"]["losses"][0]
    assert abs(first_fp8 - first_bf16) < 0.05 * first_bf16


def test_train_console_script(tmp_path):
    script = shutil.which("hf-fp8") or str(Path(sys.executable).parent / "hf-fp8")
    assert os.path.isfile(script), "the hf-fp8 console script is not installed (pip install -e .)"
    output = tmp_path / "results.json"

    done = subprocess.run([script, *TINY_TRAIN, "--output-json", str(output)], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    assert "hf_fp8 coverage:" in done.stdout
    assert "FP8 vs BF16" in done.stdout and "final train loss" in done.stdout
    assert "fp8 training" in done.stderr  # the tqdm progress bar
    check_train_results(json.loads(output.read_text()))


def test_train_without_baseline_fp32_compute(tmp_path, capsys):
    output = tmp_path / "results.json"
    assert main(TINY_TRAIN + ["--no-bf16-baseline", "--dtype", "fp32", "--output-json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert list(results["runs"]) == ["fp8"]
    assert "fp8_over_baseline" not in results
    assert "FP8:" in capsys.readouterr().out


def test_train_with_model_config(tmp_path, capsys):
    config = write_json(tmp_path / "gpt2.json", GPT2_CONFIG)
    assert main(TINY_TRAIN + ["--model-config", str(config), "--no-bf16-baseline"]) == 0
    printed = capsys.readouterr().out
    assert "GPT2LMHeadModel" in printed and "Conv1D" in printed


def test_inspect_config_json(tmp_path, capsys):
    config = write_json(tmp_path / "llama.json", LLAMA_CONFIG)
    assert main(["inspect", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "LlamaForCausalLM" in printed and "meta device" in printed
    assert "hf_fp8 coverage: 8/15 GEMM layers in FP8" in printed  # q/k/v/o of 2 layers
    assert "in_features=200 not a multiple of 16" in printed  # down_proj, with the reason


def test_inspect_model_dir_with_recipe(tmp_path, capsys):
    model_dir = tmp_path / "gpt2-tiny"
    model_dir.mkdir()
    write_json(model_dir / "config.json", GPT2_CONFIG)
    recipe = write_json(tmp_path / "recipe.json", {"fp8_format": "e4m3", "skip": ["lm_head", "*embed*", "c_proj"]})
    assert main(["inspect", str(model_dir), "--recipe", str(recipe), "--context", "64"]) == 0
    printed = capsys.readouterr().out
    assert "GPT2LMHeadModel" in printed and "Conv1D" in printed
    assert "format=e4m3" in printed and "skip pattern 'c_proj'" in printed
    assert "attention counted at context 64" in printed


def test_python_dash_m_runs_the_cli(tmp_path):
    config = write_json(tmp_path / "llama.json", LLAMA_CONFIG)
    done = subprocess.run([sys.executable, "-m", "hf_fp8", "inspect", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "hf_fp8 coverage:" in done.stdout


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda tmp: ["inspect", str(tmp / "missing")], "does not exist"),
        (lambda tmp: ["inspect", str(tmp)], "without a config.json"),
        (lambda tmp: ["inspect", str(write_json(tmp / "c.json", {"hidden_size": 64}))], 'has no "model_type"'),
        (lambda tmp: ["inspect", str(write_json(tmp / "c.json", {"model_type": "no-such-model"}))], "is not a model type"),
        (lambda tmp: ["inspect", str(write_json(tmp / "c.json", LLAMA_CONFIG)), "--recipe", str(tmp / "r.yaml")], "file not found"),
        (lambda tmp: ["train", "--steps", "0"], "must be >= 1"),
        (lambda tmp: ["train", "--lr", "nan"], "finite number > 0"),
        (lambda tmp: ["train", "--batch-size", "two"], "expected a positive integer"),
        (lambda tmp: ["train", "--seq-len", "1"], "--seq-len must be >= 2"),
        (lambda tmp: ["train", "--dtype", "fp16"], "invalid choice"),
        (lambda tmp: ["train", "--output-json", str(tmp / "no-dir" / "r.json")], "does not exist"),
        (lambda tmp: ["train", "--model-config", str(write_json(tmp / "c.json", {**LLAMA_CONFIG, "vocab_size": 100}))], "vocab_size"),
        (lambda tmp: ["train", "--model-config", str(write_json(tmp / "c.json", LLAMA_CONFIG)), "--seq-len", "256"], "max_position_embeddings"),
        (lambda tmp: ["train", "--recipe", str(write_json(tmp / "r.json", {"margn": 1}))], "Did you mean 'margin'"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path, capsys, make_argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(make_argv(tmp_path))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_train_on_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return x  # déjà vu ✓"
    ids = _data.encode(text)
    assert ids.dtype == torch.uint8 and int(ids.max()) < _data.VOCAB_SIZE
    assert _data.decode(ids) == text


def test_corpus_falls_back_to_bundled_text(monkeypatch):
    monkeypatch.setattr(_data, "stdlib_source_files", lambda: [])
    corpus = _data.load_corpus()
    assert "fallback" in corpus.source
    assert len(corpus.train) > 10 * len(corpus.heldout) / 2 > 0
    assert "eight-bit" in _data.decode(corpus.train[:200])


def test_corpus_split_is_deterministic():
    first, second = _data.load_corpus(max_bytes=200_000), _data.load_corpus(max_bytes=200_000)
    assert torch.equal(first.train, second.train) and torch.equal(first.heldout, second.heldout)
    assert len(first.heldout) > 0 and len(first.train) > len(first.heldout)


# ---------------------------------------------------------------------------------------------
# hf-fp8 push (offline: HfApi.create_repo / create_commit are recorded, not sent)
# ---------------------------------------------------------------------------------------------


def _saved_fp8_model(directory: Path) -> Path:
    import hf_fp8
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    hf_fp8.convert_model(model, hf_fp8.FP8Recipe(amax_history_len=8))
    model.save_pretrained(directory)
    return directory


def test_push_dry_run_lists_files_and_generated_card(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = _saved_fp8_model(tmp_path / "model")
    assert main(["push", str(saved), "user/tiny-fp8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("README.md", "config.json", "model.safetensors", "fp8_state.safetensors", "fp8_recipe.json"):
        assert f"  {name}\n" in out
    assert "model card: generated" in out and "amax history length | 8" in out and "- hf_fp8" in out
    assert not (saved / "README.md").exists()  # the generated card is uploaded, not written into the dir


def test_push_uploads_one_commit(tmp_path, capsys, monkeypatch):
    from huggingface_hub import HfApi, RepoUrl

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)) or RepoUrl(f"https://huggingface.co/{repo_id}"))

    def create_commit(self, repo_id, operations, **kw):
        calls.append(("commit", repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}))
        return "https://huggingface.co/user/tiny-fp8/commit/0"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    saved = _saved_fp8_model(tmp_path / "model")
    (saved / "README.md").write_text("---\ntags:\n- fp8\n---\n# my card\n")
    assert main(["push", str(saved), "user/tiny-fp8", "--private"]) == 0
    (repo, commit) = calls
    assert repo[1] == "user/tiny-fp8" and repo[2]["private"] is True
    assert set(commit[2]) == {"README.md", "config.json", "generation_config.json", "model.safetensors",
                              "fp8_state.safetensors", "fp8_recipe.json"}
    assert "README.md of" in capsys.readouterr().out


def test_push_refuses_a_directory_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(tmp_path), "user/x", "--dry-run"])
    assert exit_info.value.code == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_bench_cpu_smoke_writes_results_per_shape(tmp_path, capsys):
    """`hf-fp8 bench` (the throughput benchmark) end to end on CPU, eager, tiny shapes: every mode
    trains (finite loss), ratios are to the BF16 run, results merge into one JSON per shape."""
    out = tmp_path / "bench.json"
    common = ["--device", "cpu", "--no-compile", "--warmup", "1", "--steps", "2", "--seq-len", "64",
              "--batch-size", "2", "--quiet", "--out", str(out)]
    main(["bench", "--shape", "tiny", "--modes", "bf16,hf_fp8,hf_fp8_attn", *common])
    main(["bench", "--shape", "fog-flash-tiny", "--modes", "bf16,hf_fp8", *common])
    data = json.loads(out.read_text())
    assert set(data) == {"tiny", "fog-flash-tiny"}
    tiny = data["tiny"]
    assert tiny["batch"] == "2x64" and tiny["bf16"]["ratio_vs_bf16"] == 1.0
    for mode in ("bf16", "hf_fp8", "hf_fp8_attn"):
        assert math.isfinite(tiny[mode]["loss"]) and tiny[mode]["tokens_per_s"] > 0
        # Host time to enqueue a step: on CPU the step runs as it is enqueued.
        assert 0 < tiny[mode]["host_ms_median"] <= tiny[mode]["step_ms_median"]
        assert tiny[mode]["gpu_busy_ms"] is None  # no GPU
        assert tiny[mode]["compiled_during_timing"] == 0  # eager: nothing compiles
    assert 0 < tiny["hf_fp8"]["fp8_flop_fraction"] < tiny["hf_fp8_attn"]["fp8_flop_fraction"] < 1
    assert "reference" in tiny["hf_fp8_attn"]["attention_kernel"]  # CPU: the pure-PyTorch reference
    assert "tokens/s" not in capsys.readouterr().err


def test_bench_micro_batches_accumulate_into_one_optimizer_step(tmp_path, capsys, monkeypatch):
    """--micro-batches N: each timed step runs N forward/backward passes on batch/N sequences, then one
    optimizer step (gradient accumulation); a count that does not divide the batch is a usage error."""
    from hf_fp8 import bench

    seen = []
    real_step = bench.train_step

    def spy(model, opt, ids, micro_batches, cuda_graphs=False):
        seen.append((tuple(ids.shape), micro_batches))
        return real_step(model, opt, ids, micro_batches, cuda_graphs)

    monkeypatch.setattr(bench, "train_step", spy)
    out = tmp_path / "bench.json"
    main(["bench", "--device", "cpu", "--no-compile", "--shape", "tiny", "--modes", "hf_fp8", "--warmup", "1",
          "--steps", "2", "--seq-len", "64", "--batch-size", "4", "--micro-batches", "2", "--quiet", "--out", str(out)])
    assert seen == [((4, 64), 2)] * 3
    tiny = json.loads(out.read_text())["tiny"]
    assert tiny["micro_batches"] == 2 and tiny["batch"] == "4x64" and math.isfinite(tiny["hf_fp8"]["loss"])
    assert "in 2 micro-batches" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", "--batch-size", "4", "--micro-batches", "3"])
    assert e.value.code == 2 and "--micro-batches must be >= 1 and divide --batch-size" in capsys.readouterr().err


def test_train_step_accumulates_micro_batch_gradients():
    """bench.train_step with N micro-batches gives the gradient of the mean loss over the whole batch
    (checked against one full-batch backward before the optimizer step; FP32 tiny model)."""
    from hf_fp8 import bench

    model = bench.build_model("tiny", 32, "cpu").float()
    ids = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    full = model(input_ids=ids, labels=ids, use_cache=False).loss
    full.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    grads = []

    class Capture:  # an optimizer stand-in that records the accumulated gradients
        def step(self):
            grads.extend(p.grad.clone() for p in model.parameters())

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    loss = bench.train_step(model, Capture(), ids, micro_batches=2)
    torch.testing.assert_close(loss, full.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_train_step_with_grads_kept_allocated_matches_the_default():
    """bench.train_step(cuda_graphs=True) (the --cuda-graphs loop: gradients made by
    keep_grads_allocated and zeroed in place, never freed) trains exactly like the default loop, and
    the gradients stay the same tensors across steps (what lets accumulation add into them in place)."""
    from hf_fp8 import bench

    ids = [torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def train(cuda_graphs: bool):
        model = bench.build_model("tiny", 32, "cpu").float()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if cuda_graphs:
            bench.keep_grads_allocated(model)
        grads = [p.grad for p in model.parameters()]
        losses = [bench.train_step(model, opt, x, 2, cuda_graphs).item() for x in ids]
        kept = all(p.grad is g for p, g in zip(model.parameters(), grads))
        return losses, [p.detach().clone() for p in model.parameters()], kept

    (want_losses, want_params, _), (losses, params, kept) = train(False), train(True)
    assert kept
    assert losses == pytest.approx(want_losses, rel=1e-6)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bench_profile_writes_a_kernel_table_per_mode(tmp_path, capsys):
    main(["bench", "--device", "cpu", "--no-compile", "--shape", "tiny", "--modes", "bf16,hf_fp8", "--seq-len", "32",
          "--batch-size", "2", "--warmup", "1", "--steps", "1", "--quiet", "--profile", str(tmp_path / "prof")])
    for mode in ("bf16", "hf_fp8"):
        table = (tmp_path / "prof" / f"tiny_{mode}.txt").read_text()
        assert "Optimizer.step" in table and "CPU total" in table, mode
        kernels = (tmp_path / "prof" / f"tiny_{mode}_kernels.tsv").read_text().splitlines()
        assert kernels[:2] == [f"# tiny {mode}: device kernels over 3 profiled steps, 0.000 ms per step in all",
                               "ms_per_step\tcalls_per_step\tkernel"], kernels  # fmt: skip
        assert len(kernels) == 2  # a CPU run: no device kernels
        kinds = (tmp_path / "prof" / f"tiny_{mode}_kinds.tsv").read_text().splitlines()
        assert kinds == ["kind\tms_per_step\tcalls_per_step"], kinds
    assert capsys.readouterr().out.count("device kernel ms per step: no device kernels") == 2


def test_bench_kernel_kinds_from_h200_kernel_names():
    """--profile sums the kernels by kind; the names are those of an 8B-slice hf_fp8 step on the H200
    (RESULTS (36)), one or two per kind, and the sums keep every kernel."""
    from hf_fp8.bench import kernel_kind, kernels_by_kind

    rows = [
        (31.35, 36, "nvjet_sm90_qrtst_128x160_128x5_2x1_v_bz_coopA_algo2_TNT"),
        (0.0035, 1, "void cutlass::Kernel2<cutlass_80_simt_sgemm_128x32_8x5_nn_align1>(cutlass_80_simt_sgemm_128x32_8x5_nn_align1::Params)"),
        (12.14, 4, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1_kernel0_0"),
        (0.53, 4, "void cudnn::fusion::compute_dot_do_o_specialized<true, 128>(void const*, void const*, void*)"),
        (4.2, 16, "fp8_attention_bwd_dkdv_kernel"),
        (6.73, 55, "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::FusedOptimizerTensorListMetadata<4>>"),
        (2.13, 1, "void at::native::(anonymous namespace)::cunn_SoftMaxBackward<4, float, float, float>(float*, float const*)"),
        (2.32, 44, "transpose_bytes_kernel"),
        (2.96, 4, "triton_red_fused__to_copy_abs_amax_clamp_mul_select_silu_silu_backward_view_4"),
        (0.11, 106, "Memset (Device)"),
        (0.93, 13, "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)>"),
    ]
    kinds = [kernel_kind(name) for _, _, name in rows]
    assert kinds == ["GEMM", "GEMM", "attention", "attention", "attention", "optimizer, foreach", "loss",
                     "hf_fp8 casts", "inductor", "other", "other"]  # fmt: skip
    summed = kernels_by_kind(rows)
    assert list(summed) == ["attention", "GEMM", "optimizer, foreach", "loss", "hf_fp8 casts", "inductor", "other"]
    assert summed["GEMM"] == pytest.approx((31.3535, 37)) and summed["other"] == pytest.approx((1.04, 119))
    assert sum(ms for ms, _ in summed.values()) == pytest.approx(sum(ms for ms, _, _ in rows))


def test_bench_profiles_only_after_every_mode_is_timed(tmp_path, monkeypatch):
    """A profiler session slows the process after it (on the H200 the third mode of a 1.5B run took
    185 ms per step against 172 alone when each mode was profiled right after its timed steps), so
    --profile (and --gpu-time) profile in a pass of their own once every mode's timed steps are done."""
    from hf_fp8 import bench

    events = []
    real_step, real_profiled = bench.train_step, bench._profiled_steps
    monkeypatch.setattr(bench, "train_step", lambda *a, **k: events.append("step") or real_step(*a, **k))
    monkeypatch.setattr(bench, "_profiled_steps", lambda *a, **k: events.append("profile") or real_profiled(*a, **k))
    main(["bench", "--device", "cpu", "--no-compile", "--shape", "tiny", "--modes", "bf16,hf_fp8,hf_fp8_attn", "--seq-len", "32",
          "--batch-size", "2", "--warmup", "1", "--steps", "2", "--quiet", "--profile", str(tmp_path / "prof")])  # fmt: skip
    timed = 3 * (1 + 2)
    assert events[:timed] == ["step"] * timed and events.count("profile") == 3, events
    assert sorted(p.name for p in (tmp_path / "prof").glob("*.txt")) == [f"tiny_{m}.txt" for m in ("bf16", "hf_fp8", "hf_fp8_attn")]


def test_bench_gpu_time_needs_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", "--shape", "tiny", "--gpu-time"])
    assert e.value.code == 2 and "--gpu-time needs a CUDA device" in capsys.readouterr().err


def test_bench_cuda_graphs_needs_compiled_cuda(capsys):
    for extra in (["--device", "cpu"], ["--device", "cpu", "--no-compile"]):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--shape", "tiny", "--cuda-graphs", *extra])
        assert e.value.code == 2 and "--cuda-graphs needs compilation on a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU time and CUDA graphs need a CUDA device")
@pytest.mark.parametrize("graphs", [[], ["--cuda-graphs"]])
def test_bench_on_cuda_reports_gpu_time_within_the_step(tmp_path, graphs):
    """On the GPU (tiny shape, compiled, 2 micro-batches, with and without CUDA graphs): every mode
    trains, and the GPU time of a step (kernels summed under the profiler, graphs' kernels included)
    is positive and no more than the step's wall time (one stream: kernels do not overlap)."""
    out = tmp_path / "bench.json"
    main(["bench", "--shape", "tiny", "--modes", "bf16,hf_fp8,hf_fp8_attn", "--warmup", "3", "--steps", "3",
          "--seq-len", "256", "--batch-size", "4", "--micro-batches", "2", "--quiet", "--gpu-time", "--out", str(out),
          "--profile", str(tmp_path / "prof"), *graphs])  # fmt: skip
    tiny = json.loads(out.read_text())["tiny"]
    assert tiny.get("cuda_graphs", False) == bool(graphs)
    for mode in ("bf16", "hf_fp8", "hf_fp8_attn"):
        r = tiny[mode]
        assert math.isfinite(r["loss"]), (mode, r)
        assert 0 < r["gpu_busy_ms"] <= 1.05 * r["step_ms_median"], (mode, r)
        # --profile's full kernel list: its per-step total is the GPU time of other profiled steps.
        header, _, *rows = (tmp_path / "prof" / f"tiny_{mode}_kernels.tsv").read_text().splitlines()
        per_step = [float(row.split("\t")[0]) for row in rows]
        assert all(ms > 0 for ms in per_step) and per_step == sorted(per_step, reverse=True), (mode, rows)
        assert sum(per_step) == pytest.approx(r["gpu_busy_ms"], rel=0.25), (mode, header)
        _, *kinds = (tmp_path / "prof" / f"tiny_{mode}_kinds.tsv").read_text().splitlines()
        assert sum(float(row.split("\t")[1]) for row in kinds) == pytest.approx(sum(per_step), rel=1e-3), kinds


def test_bench_fog_shape_is_the_recipe_file():
    from hf_fp8 import bench
    from hf_fp8.models.fog import FOGConfig

    ours = FOGConfig(**bench.FOG_SHAPES["fog-flash-1.5b"])
    recipe = FOGConfig.from_json_file(str(Path(__file__).resolve().parents[1] / "recipes/models/fog-flash-1.5b.json"))
    for field in ("variant", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "softmax_scale"):
        assert getattr(ours, field) == getattr(recipe, field), field


def test_bench_bad_modes_and_missing_cuda_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", "--modes", "fastest"])
    assert e.value.code == 2 and "unknown fastest" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["bench"])
        assert "no CUDA device" in capsys.readouterr().err


def test_bench_compile_options_reach_every_layer_and_the_results(tmp_path, capsys, monkeypatch):
    """--compile-options (inductor config for every mode's per-layer compile, so BF16 gets the same)
    is validated against inductor's config names, refused with --no-compile, passed to each layer's
    compile and recorded with the shape's results."""
    from torch import nn

    seen = []
    real_compile = nn.Module.compile

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("options"))
        return real_compile(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", spy)
    out = tmp_path / "bench.json"
    options = {"triton.tile_reductions": True}
    main(["bench", "--device", "cpu", "--shape", "tiny", "--modes", "bf16", "--warmup", "1", "--steps", "1",
          "--seq-len", "32", "--batch-size", "1", "--quiet", "--out", str(out), "--compile-options", json.dumps(options)])
    assert seen == [options, options]  # the tiny shape's two decoder layers
    assert json.loads(out.read_text())["tiny"]["compile_options"] == options
    assert '"triton.tile_reductions": true' in capsys.readouterr().out
    for bad, why in [('{"no_such_option": 1}', "unknown inductor option(s) no_such_option"), ("[1]", "expected a JSON object"),
                     ("{oops", "not JSON")]:
        with pytest.raises(SystemExit):
            main(["bench", "--device", "cpu", "--compile-options", bad])
        assert why in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cpu", "--no-compile", "--compile-options", json.dumps(options)])
    assert "needs compilation" in capsys.readouterr().err


def test_bench_flags_compilation_inside_the_timed_steps(tmp_path, capsys):
    """A compiled FP8 mode compiles again once its delayed scales exist (step 1 on CPU, 2 on CUDA).
    With too few warm-up steps that compilation lands in the timed steps (on the H200, --warmup 2 timed
    hf_fp8_attn at 4.9 s per step instead of 0.17): the bench warns, counts the graphs in the results
    and stars the ratio, in the printed table and in --results-md. BF16 compiles once: not flagged."""
    out, md = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    main(["bench", "--device", "cpu", "--shape", "tiny", "--modes", "bf16,hf_fp8", "--warmup", "1", "--steps", "2",
          "--seq-len", "32", "--batch-size", "1", "--quiet", "--out", str(out), "--results-md", str(md)])  # fmt: skip
    printed = capsys.readouterr().out
    tiny = json.loads(out.read_text())["tiny"]
    assert tiny["bf16"]["compiled_during_timing"] == 0
    assert tiny["hf_fp8"]["compiled_during_timing"] >= 1
    assert "WARNING: hf_fp8 compiled" in printed and "use --warmup 3 or more" in printed
    assert "WARNING: bf16" not in printed
    for text in (printed, md.read_text()):
        assert f"{tiny['hf_fp8']['ratio_vs_bf16']:.3f}*" in text and "* compiled during the timed steps" in text
        assert "1.000*" not in text


def test_bench_data_is_learnable_and_the_same_for_every_mode():
    """The benchmark's batches follow a fixed successor map (90%) over ALPHABET ids, fresh per step and
    identical across calls, so "loss after the timed steps" compares learning, not memorized noise."""
    from hf_fp8.bench import ALPHABET, learnable_batches

    a, b = learnable_batches(3, 2, 512), learnable_batches(3, 2, 512)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], a[1])
    ids = torch.cat(a)
    assert 0 <= ids.min() and ids.max() < ALPHABET
    succ = torch.randperm(ALPHABET, generator=torch.Generator().manual_seed(1))
    follows = (succ[ids[:, :-1]] == ids[:, 1:]).float().mean().item()
    assert 0.88 < follows < 0.92, follows
