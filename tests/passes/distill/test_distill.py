"""distill on tiny Llamas: a perturbed, pruned or layer-dropped student moves toward its teacher on held-out
windows; pruned zeros stay zero; an interrupted run resumes to the exact weights of an uninterrupted one; bad
configs fail with one line naming the key; through the CLI, INT4 RTN + distill ends closer to the original
than INT4 RTN alone."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from compressor.context import RunContext
from compressor.errors import PassError, RecipeError
from compressor.model import load_model
from compressor.passes.distill._trainer import Checkpoints, batch_indices, lr_at
from compressor.passes.distill.distill import DistillConfig, run
from compressor.passes.quantize._gptq_math import one_thread
from compressor.recipe import DataSpec, ModelSpec
from compressor.targets import get_target
from conftest import run_cli, run_report, tiny_eval, write_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: one intra-op thread (several threads spin-wait on a loaded 2-core machine)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def windows(tiny_model_dir, text_dir):
    from transformers import AutoTokenizer

    from compressor.calibration.data import calibration_windows

    return calibration_windows(AutoTokenizer.from_pretrained(tiny_model_dir), str(text_dir), 32, 64, 0)


def _handle(tiny_model_dir, perturb: float = 0.0):
    h = load_model(ModelSpec(source=str(tiny_model_dir)))
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in h.model.named_parameters():
                if p.dim() == 2 and ".layers." in n:
                    p.add_(torch.randn(p.shape, generator=g) * perturb)
    return h


def _final(h) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ctx(tmp_path, windows, cache="cache", **kw) -> RunContext:
    return RunContext(get_target("cpu"), tmp_path / "work", tmp_path / cache, quiet=True,
                      calibration=(lambda: windows) if windows is not None else None, **kw)


# ------------------------------------------------------------------------------------------------------------
# Trainer pieces


def test_learning_rate_schedule():
    # warmup 2 steps, then cosine over the remaining 9 (steps 2..10) from 1e-3 down to 0
    assert [lr_at(s, 11, 1e-3, 2, "cosine") for s in (0, 1, 2)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert lr_at(6, 11, 1e-3, 2, "cosine") == pytest.approx(5e-4)  # halfway: cos(pi / 2)
    assert lr_at(10, 11, 1e-3, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_at(4, 11, 1e-3, 2, "cosine") == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(4, 11, 1e-3, 2, "linear") == pytest.approx(7.5e-4)
    assert lr_at(10, 11, 1e-3, 2, "linear", min_ratio=0.1) == pytest.approx(1e-4)
    assert lr_at(10, 11, 1e-3, 2, "constant") == 1e-3


def test_batches_cover_every_window_once_per_epoch_and_are_deterministic():
    n, batch = 10, 4
    first = torch.cat([batch_indices(s, n, batch, seed=3) for s in range(5)])  # 20 windows: two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert not torch.equal(first[:10], first[10:])  # a fresh order each epoch
    assert torch.equal(first, torch.cat([batch_indices(s, n, batch, seed=3) for s in range(5)]))
    assert not torch.equal(first, torch.cat([batch_indices(s, n, batch, seed=4) for s in range(5)]))


def test_checkpoints_are_replaced_whole_and_restore_exactly(tmp_path):
    p = {"w": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.nn.Parameter(torch.randn(4))}
    opt = torch.optim.AdamW(p.values(), lr=0.1)
    sum((t ** 2).sum() for t in p.values()).backward()
    opt.step()
    ck = Checkpoints(tmp_path / "ck")
    ck.save(1, p, opt, {"loss_start": 2.5})
    opt.step()
    ck.save(2, p, opt, {"loss_start": 2.5})
    assert sorted(f.name for f in ck.folder.iterdir()) == ["optim-2.pt", "state.json", "weights-2.safetensors"]
    want = {k: v.detach().clone() for k, v in p.items()}
    exp_avg = opt.state[p["w"]]["exp_avg"].clone()
    q = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in p.items()}
    opt2 = torch.optim.AdamW(q.values(), lr=0.1)
    state = ck.load(q, opt2)
    assert state["step"] == 2 and state["loss_start"] == 2.5
    assert all(torch.equal(q[k], want[k]) for k in p)
    assert torch.equal(opt2.state[q["w"]]["exp_avg"], exp_avg)
    assert ck.load({"w": torch.nn.Parameter(torch.zeros(2, 2))}, opt2) is None  # another model: not resumed


# ------------------------------------------------------------------------------------------------------------
# The pass on tiny models


def test_distilling_a_perturbed_student_cuts_held_out_kl(tiny_model_dir, windows, tmp_path):
    h = _handle(tiny_model_dir, perturb=0.02)
    info = run(h, DistillConfig(steps=30, lr=1e-3, micro_batch_size=2, log_every=0), _ctx(tmp_path, windows)).info
    assert info["heldout_kl_after"] < 0.4 * info["heldout_kl_before"], info
    assert info["loss_end"] < 0.5 * info["loss_start"]
    assert (info["steps"], info["train_windows"], info["heldout_windows"]) == (30, 29, 3)
    assert info["tokens"] == 30 * 2 * 64 and info["device"] == "cpu" and info["data"] == "calibration"
    assert info["resumed"] is False and info["stopped_early"] is None and info["checkpoints"] == "removed"
    assert info["qat_layers"] == 0 and info["teacher"] == str(tiny_model_dir)
    assert not list((tmp_path / "cache" / "distill-checkpoints").glob("*/state.json"))
    assert not h.model.training and not any(p.requires_grad for p in h.model.parameters())


def _prune_half(model) -> dict[str, torch.Tensor]:
    """Zero the smaller half (by magnitude) of every Linear weight in the blocks; -> {name: zero mask}."""
    masks = {}
    with torch.no_grad():
        for n, mod in model.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                thr = w.abs().flatten().kthvalue(w.numel() // 2).values
                w[w.abs() <= thr] = 0.0
                masks[f"model.layers.{n}"] = w == 0
    return masks


def _prune_pass(h, tmp_path, pattern: str | None = None) -> dict[str, torch.Tensor]:
    """The prune pass (magnitude, 50% or N:M), which records its layers; -> {name: zero mask}."""
    from compressor.passes.prune import sparsity

    cfg = sparsity.PruneConfig(method="magnitude", **({"pattern": pattern} if pattern else {"sparsity": 0.5}))
    sparsity.run(h, cfg, _ctx(tmp_path, None))
    assert len(h.model.config.compressor_sparsity) == 14
    return {n: h.model.get_submodule(n).weight == 0 for n in h.model.config.compressor_sparsity}


@pytest.mark.parametrize("how", ["prune-pass", "config-record", "unrecorded"])
def test_pruned_zeros_stay_zero(how, tiny_model_dir, windows, tmp_path):
    h = _handle(tiny_model_dir)
    if how == "prune-pass":
        zeros = _prune_pass(h, tmp_path)
    else:
        zeros = _prune_half(h.model)
    if how == "config-record":  # what a model reloaded from the stage cache carries
        h.model.config.compressor_sparsity = {n: "unstructured" for n in zeros}
    cfg = DistillConfig(steps=60, lr=1e-3, micro_batch_size=2, log_every=0)
    info = run(h, cfg, _ctx(tmp_path, windows)).info
    assert info["heldout_kl_after"] < 0.5 * info["heldout_kl_before"], info
    assert info["sparsity_masked_layers"] == 14
    assert info["zeros_kept"] == sum(int(z.sum()) for z in zeros.values())
    for n, z in zeros.items():
        w = h.model.get_submodule(n).weight
        assert torch.equal(w == 0, z), n  # the same zeros, and no new ones
        assert 0.49 <= float(z.float().mean()) <= 0.51


def test_pruned_2of4_then_quantized_stays_2of4_through_qat(tiny_model_dir, windows, tmp_path):
    from compressor.passes.quantize import rtn

    h = _handle(tiny_model_dir)
    zeros = _prune_pass(h, tmp_path, pattern="2:4")
    rtn.run(h, rtn.RTNConfig(format="int4", granularity="per_group", group_size=16), _ctx(tmp_path, None))
    codes = {n: h.model.get_submodule(n).weight_packed.clone() for n in zeros}
    info = run(h, DistillConfig(steps=20, lr=3e-4, log_every=0), _ctx(tmp_path, windows)).info
    assert info["qat_layers"] == 14 and info["sparsity_masked_layers"] == 14
    for n, z in zeros.items():
        w = h.model.get_submodule(n).dequantized_weight()
        assert bool((w[z] == 0).all()), n  # symmetric int4: code 8 is exactly 0
        assert int((w.reshape(-1, 4) != 0).sum(-1).max()) <= 2, n  # still at most 2 nonzeros in every 4
    assert sum(int((h.model.get_submodule(n).weight_packed != c).sum()) for n, c in codes.items()) > 0


def test_without_keep_sparsity_the_zeros_are_trained_away(tiny_model_dir, windows, tmp_path):
    h = _handle(tiny_model_dir)
    zeros = _prune_half(h.model)
    info = run(h, DistillConfig(steps=5, lr=1e-3, keep_sparsity=False, log_every=0), _ctx(tmp_path, windows)).info
    assert info["sparsity_masked_layers"] == 0
    left = sum(int((h.model.get_submodule(n).weight == 0).sum()) for n in zeros)
    assert left < 0.01 * sum(int(z.sum()) for z in zeros.values())


def test_layer_dropped_student_learns_with_the_feature_loss(tiny_model_dir, windows, tmp_path):
    h = _handle(tiny_model_dir)
    del h.model.model.layers[1]  # as structured layer pruning leaves it: 1 block against the teacher's 2
    h.model.config.num_hidden_layers = 1
    if getattr(h.model.config, "layer_types", None):
        h.model.config.layer_types = h.model.config.layer_types[:1]
    cfg = DistillConfig(steps=60, lr=1e-3, micro_batch_size=2, feature_loss_weight=0.1, log_every=0)
    info = run(h, cfg, _ctx(tmp_path, windows)).info
    assert info["feature_layer_map"] == {0: 1}  # relative depth: the student's only block meets the teacher's last
    assert info["heldout_kl_after"] < 0.5 * info["heldout_kl_before"], info
    assert info["loss_start"] > 3 * info["heldout_kl_before"]  # the hidden-state term is in the loss
    with pytest.raises(PassError, match=r"layer_map 0: 5 is out of range \(student has 1 layers, teacher 2\)"):
        run(h, DistillConfig(steps=1, feature_loss_weight=1.0, layer_map={0: 5}), _ctx(tmp_path, windows))


def test_train_data_is_read_from_the_calibration_part_never_the_eval_windows(tiny_model_dir, text_dir, tmp_path):
    from compressor.calibration.data import calibration_windows, eval_windows

    h = _handle(tiny_model_dir, perturb=0.02)
    data = DataSpec(source=str(text_dir), num_samples=12, seq_len=48, seed=5)
    cfg = DistillConfig(epochs=1, micro_batch_size=3, lr=1e-3, train_data=data, holdout_samples=2, log_every=0)
    info = run(h, cfg, _ctx(tmp_path, None)).info
    assert (info["data"], info["train_windows"], info["heldout_windows"], info["seq_len"]) == ("train_data", 10, 2, 48)
    assert info["total_steps"] == info["steps"] == 4  # one epoch: ceil(10 windows / 3 a step)
    assert info["heldout_kl_after"] < info["heldout_kl_before"]
    train = calibration_windows(h.tokenizer, str(text_dir), 12, 48, 5)
    held = eval_windows(h.tokenizer, str(text_dir), 8, 64)

    def grams(w, k=12):
        return {tuple(r[i:i + k].tolist()) for r in w for i in range(len(r) - k + 1)}

    assert not grams(train) & grams(held)  # no 12-token run of the eval windows appears in the training data


def test_no_training_data_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(PassError, match="no training data: set train_data or add a `calibration:` section"):
        run(_handle(tiny_model_dir), DistillConfig(steps=1), _ctx(tmp_path, None))


@pytest.mark.parametrize("fields, message", [
    ({"holdout_samples": 32}, "holdout_samples 32 leaves no training windows of 32"),
    ({"freeze": ["*"]}, r"freeze \['\*'\] leaves no parameter to train"),
])
def test_runtime_config_errors_name_the_key(fields, message, tiny_model_dir, windows, tmp_path):
    h = _handle(tiny_model_dir)
    before = _final(h)
    with pytest.raises(PassError, match=message) as e:
        run(h, DistillConfig(steps=1, **fields), _ctx(tmp_path, windows))
    assert e.value.exit_code == 2
    assert _same(_final(h), before) and not any(p.requires_grad for p in h.model.parameters())


# ------------------------------------------------------------------------------------------------------------
# Resume


def test_a_run_stopped_by_max_minutes_resumes_to_the_uninterrupted_weights(tiny_model_dir, windows, tmp_path):
    # device cpu: bit-exact equality needs deterministic kernels (CUDA's embedding backward is not)
    cfg = dict(steps=6, lr=1e-3, warmup_steps=2, micro_batch_size=2, grad_accum=2, checkpoint_every=4, log_every=0,
               device="cpu")
    ref = _handle(tiny_model_dir, perturb=0.02)
    run(ref, DistillConfig(**cfg), _ctx(tmp_path, windows, cache="ref"))
    want = _final(ref)

    h = _handle(tiny_model_dir, perturb=0.02)
    info = run(h, DistillConfig(**cfg, max_minutes=1e-9), _ctx(tmp_path, windows)).info
    assert (info["steps"], info["stopped_early"], info["checkpoints"]) == (1, "max_minutes", "kept (stopped early)")
    assert "stopped by max_minutes at step 1 of 6" in info["notes"][0]
    assert not _same(_final(h), want)
    (ck,) = (tmp_path / "cache" / "distill-checkpoints").iterdir()
    assert json.loads((ck / "state.json").read_text())["step"] == 1

    h = _handle(tiny_model_dir, perturb=0.02)  # a rerun of the same recipe (the budget lifted)
    info = run(h, DistillConfig(**cfg), _ctx(tmp_path, windows)).info
    assert (info["resumed"], info["resumed_from_step"], info["steps_this_run"], info["steps"]) == (True, 1, 5, 6)
    assert info["tokens"] == 6 * 4 * 64 and info["checkpoints"] == "removed" and not ck.exists()
    assert _same(_final(h), want)


class _Interrupted(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class _CrashingContext(RunContext):
    """A run killed after `crash_after` optimizer steps (as Ctrl-C would), seen through the progress bar."""

    crash_after: int = 0

    def progress(self, iterable, total=None, desc="", unit="it"):
        for i, x in enumerate(iterable):
            if i == self.crash_after:
                raise _Interrupted(f"killed after {i} steps")
            yield x


def test_a_crashed_qat_run_resumes_from_its_last_checkpoint_to_the_same_weights(tiny_model_dir, windows, tmp_path):
    from compressor.passes.quantize import rtn

    def quantized():
        h = _handle(tiny_model_dir)
        rtn.run(h, rtn.RTNConfig(format="int4", granularity="per_group", group_size=16), _ctx(tmp_path, None))
        return h

    cfg = DistillConfig(steps=5, lr=3e-4, checkpoint_every=2, log_every=0, device="cpu")
    ref = quantized()
    before = _final(ref)
    run(ref, cfg, _ctx(tmp_path, windows, cache="ref"))
    want = _final(ref)
    assert not _same(want, before)

    crash = _CrashingContext(get_target("cpu"), tmp_path / "work", tmp_path / "cache", quiet=True,
                             calibration=lambda: windows, crash_after=3)
    with pytest.raises(_Interrupted):
        run(quantized(), cfg, crash)
    (ck,) = (tmp_path / "cache" / "distill-checkpoints").iterdir()
    assert json.loads((ck / "state.json").read_text())["step"] == 2  # steps 1-3 ran; the checkpoint is at 2

    h = quantized()
    info = run(h, cfg, _ctx(tmp_path, windows)).info
    assert (info["resumed_from_step"], info["steps_this_run"], info["qat_layers"]) == (2, 3, 14)
    assert _same(_final(h), want)


def test_no_cache_neither_reads_nor_writes_checkpoints(tiny_model_dir, windows, tmp_path):
    cfg = DistillConfig(steps=3, lr=1e-3, max_minutes=1e-9, log_every=0)
    info = run(_handle(tiny_model_dir, 0.02), cfg, _ctx(tmp_path, windows, cache_enabled=False)).info
    assert info["checkpoints"] == "disabled (--no-cache)" and info["stopped_early"] == "max_minutes"
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------------------
# Recipes


def _recipe(tmp_path, tiny_model_dir, text_dir, passes: str, calibration: bool = True):
    calib = f"calibration:\n  source: {text_dir}\n  num_samples: 32\n  seq_len: 64\n" if calibration else ""
    return write_recipe(tmp_path / "recipe.yaml", f"""
schema_version: 1
name: tiny
model:
  source: {tiny_model_dir}
{calib}
passes:
{passes}
export: []
{tiny_eval(text_dir, "{enabled: false}")}
""")


RTN4 = "  - {pass: quantize_rtn, format: int4, granularity: per_group, group_size: 16}\n"


@pytest.mark.parametrize("fields, message", [
    ("lr: 0", "lr: Input should be greater than 0"),
    ("temperature: -1", "temperature: Input should be greater than 0"),
    ("lr: 1.0e-4", "steps and epochs are both 0 or missing"),
    ("steps: 0, epochs: 0", "steps and epochs are both 0 or missing"),
    ("steps: 5, layer_map: {0: 1}", "layer_map is only used by the feature loss"),
    ("steps: 5, betas: [0.9, 1.5]", "betas must lie in [0, 1)"),
    ("steps: 5, learning_rate: 0.1", "unknown key 'learning_rate'"),
])
def test_bad_configs_fail_at_plan_time_naming_the_key(fields, message, tmp_path, tiny_model_dir, text_dir):
    from compressor.pipeline import load_and_plan

    recipe = _recipe(tmp_path, tiny_model_dir, text_dir, RTN4 + f"  - {{pass: distill, {fields}}}\n")
    with pytest.raises(RecipeError) as e:
        load_and_plan(str(recipe), "cpu")
    msg = str(e.value)
    assert message in msg and "passes.1" in msg and "\n" not in msg, msg


def test_distill_without_any_training_data_is_refused_at_plan_time(tmp_path, tiny_model_dir, text_dir):
    from compressor.pipeline import load_and_plan

    recipe = _recipe(tmp_path, tiny_model_dir, text_dir, "  - {pass: distill, steps: 5}\n", calibration=False)
    with pytest.raises(RecipeError, match="pass distill needs calibration data"):
        load_and_plan(str(recipe), "cpu")
    recipe = _recipe(tmp_path, tiny_model_dir, text_dir,
                     f"  - {{pass: distill, steps: 5, train_data: {{source: {text_dir}}}}}\n", calibration=False)
    load_and_plan(str(recipe), "cpu")  # train_data alone is enough


def test_int4_then_distill_through_the_cli_ends_closer_to_the_original(tmp_path, tiny_model_dir, text_dir, home,
                                                                       capsys):
    kl, size = {}, {}
    distill = "  - {pass: distill, steps: 60, lr: 1.0e-4, micro_batch_size: 2}\n"
    for name, passes in {"rtn": RTN4, "rtn+distill": RTN4 + distill}.items():
        recipe = _recipe(tmp_path, tiny_model_dir, text_dir, passes)
        report = run_report(recipe, tmp_path / name, capsys)
        kl[name] = report["result"]["metrics"]["kl_divergence"]
        size[name] = report["result"]["metrics"]["model_bytes"]
    info = report["passes"][1]["info"]
    assert report["passes"][1]["name"] == "distill" and info["qat_layers"] == 14 and info["steps"] == 60
    assert info["heldout_kl_after"] < info["heldout_kl_before"]
    assert kl["rtn+distill"] < 0.7 * kl["rtn"], kl
    # The quantized layers are still INT4 QuantLinears after distillation: the same bytes as RTN alone.
    assert report["result"]["metrics"]["model_bytes"] == size["rtn"]
    rc, _, err = run_cli([recipe, "--target", "cpu", "--out", tmp_path / "again", "--quiet"], capsys)
    assert rc == 0, err
    again = json.loads((tmp_path / "again" / "report" / "report.json").read_text())
    assert again["passes"][1]["cached"] is True and again["result"]["metrics"]["kl_divergence"] == kl["rtn+distill"]


def test_a_stage_stopped_by_max_minutes_is_not_cached_and_the_rerun_resumes(tmp_path, tiny_model_dir, text_dir, home,
                                                                           capsys):
    """The pipeline does not cache a stage whose pass stopped early: the same recipe run again resumes training from
    the kept checkpoint instead of reusing the partial model."""
    distill = "  - {pass: distill, steps: 4, lr: 1.0e-4, max_minutes: 1.0e-9, checkpoint_every: 1}\n"
    recipe = _recipe(tmp_path, tiny_model_dir, text_dir, distill)
    first = run_report(recipe, tmp_path / "first", capsys)["passes"][0]
    assert first["cached"] is False and first["info"]["stopped_early"] == "max_minutes" and first["info"]["steps"] == 1
    second = run_report(recipe, tmp_path / "second", capsys)["passes"][0]
    assert second["cached"] is False and second["info"]["resumed"] is True
    assert second["info"]["resumed_from_step"] == 1 and second["info"]["steps"] == 2  # one more step per run
