"""The precision rule (analog_ep/fast/precision.py): int8 refused without our int8 kernels and bf16 on a CPU without
bf16 instructions (on every machine: the capability checks are patched both ways), each with its opt-in; auto never
slower than fp32; the calibration cached per machine."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from analog_ep.errors import ConfigError
from analog_ep.fast import folded, lowp_weights, precision
from analog_ep.fast.precision import Machine, ShapeClass, choose, resolve_precision
from analog_ep.models import build_spec

LARGE = build_spec("snli", tiny=False)  # the SNLI paper graph: FC-1 of 30,000 × 400 weights
SMALL = build_spec("imdb", tiny=True)  # no synapse large enough for low-precision products


RESOLVE_FOLD = folded.resolve_fold


@pytest.fixture(autouse=True)
def private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SEQEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(precision, "_warned", set())
    # the rule without the fold (LARGE, the SNLI graph, folds on the exact path): tested on its own below
    monkeypatch.setattr(folded, "resolve_fold", lambda *args, **kwargs: (False, "off: not tested here"))


def fake_timings(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> list[tuple]:
    """`measure` replaced by fixed timings; returns the list of its calls."""
    calls: list[tuple] = []

    def measured(shape, modes, device="cpu"):
        calls.append((shape, tuple(modes)))
        return {m: seconds[m] for m in modes}

    monkeypatch.setattr(precision, "measure", measured)
    return calls


def amx(monkeypatch: pytest.MonkeyPatch, present: bool, which: str = "AMX kernels") -> None:
    """Our int8 kernels present (`which`: AMX or AVX2) or not, whatever the real CPU has."""
    monkeypatch.setattr(precision, "int8_kernels", lambda: (present, which if present else "this CPU lacks amx_tile"))
    monkeypatch.setattr(lowp_weights, "int8_available", lambda device="cpu": True)


def bf16_instructions(monkeypatch: pytest.MonkeyPatch, present: bool = True) -> Machine:
    """This machine as one with (or without) bf16 dot-product instructions, whatever the real CPU has."""
    flags = ("avx2", "avx512f", "avx512_bf16") if present else ("avx2",)
    machine = Machine("cpu", "Test CPU", flags, torch.__version__, torch.get_num_threads())
    monkeypatch.setattr(precision, "this_machine", lambda device="cpu": machine)
    return machine


def test_auto_on_a_cpu_without_bf16_instructions_or_amx_is_fp32_without_measuring(monkeypatch):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch, present=False)
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("nothing to measure"))
    mode, reason = resolve_precision("auto", LARGE)
    assert mode == "fp32" and "no bf16 dot-product instructions" in reason and "amx_tile" in reason


def test_int8_without_our_kernels_is_refused_with_the_reason_and_the_alternatives(monkeypatch):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch)
    calls = fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    with pytest.raises(ConfigError) as refused:
        resolve_precision("int8", LARGE)
    message = str(refused.value)
    assert "this CPU lacks amx_tile" in message and "hundreds of times slower than fp32" in message
    assert "8.8 s in int8 against 0.026 s in fp32" in message  # the measurement docs/benchmarks.md records
    assert "precision auto (the fastest faithful mode here), fp32 or bf16;" in message
    assert "to run int8 anyway, precision int8-library" in message
    mode, reason = resolve_precision("int8-library", LARGE)  # the explicit opt-in runs it anyway
    assert mode == "int8" and "oneDNN" in reason and "this CPU lacks amx_tile" in reason
    assert not calls  # an explicit int8 request measures nothing


def test_int8_refused_on_a_cpu_without_bf16_instructions_offers_no_bf16(monkeypatch):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch, present=False)
    with pytest.raises(ConfigError) as refused:
        resolve_precision("int8", LARGE)
    assert "Use precision auto (the fastest faithful mode here) or fp32;" in str(refused.value)


@pytest.mark.parametrize("spec", [LARGE, SMALL], ids=["large-synapse", "small"])  # small: the retrieval is bf16
def test_bf16_on_a_cpu_without_bf16_instructions_is_refused_with_the_measurement(monkeypatch, spec):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch, present=False)
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("an explicit bf16 measures nothing"))
    with pytest.raises(ConfigError) as refused:
        resolve_precision("bf16", spec)
    message = str(refused.value)
    assert "needs bf16 dot-product instructions (avx512_bf16 or amx_bf16)" in message
    assert "Test CPU has none of avx512_bf16, amx_bf16" in message
    assert "1,222 ms in bf16 against 46 ms in fp32" in message  # the measurement docs/benchmarks.md records
    assert "Use precision auto (the fastest faithful mode here) or fp32;" in message
    assert "to run bf16 anyway, precision bf16-emulated" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mode, reason = resolve_precision("bf16-emulated", spec)  # the explicit opt-in runs it, without a warning
    assert mode == "bf16"
    assert reason.startswith("bf16: requested as bf16-emulated: torch's emulated bf16 products")
    assert "Test CPU has none of avx512_bf16, amx_bf16" in reason


def test_bf16_refused_offers_int8_where_the_amx_kernels_run(monkeypatch):
    amx(monkeypatch, present=True)
    bf16_instructions(monkeypatch, present=False)
    with pytest.raises(ConfigError, match=r"Use precision auto \(the fastest faithful mode here\), fp32 or int8;"):
        resolve_precision("bf16", LARGE)


def test_bf16_on_a_cpu_with_bf16_instructions_or_on_a_gpu_is_not_refused(monkeypatch):
    amx(monkeypatch, present=False)
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    bf16_instructions(monkeypatch, present=True)
    assert resolve_precision("bf16", LARGE)[0] == "bf16"
    assert resolve_precision("bf16-emulated", LARGE) == resolve_precision("bf16", LARGE)  # nothing emulated here
    bf16_instructions(monkeypatch, present=False)
    assert resolve_precision("bf16", LARGE, device="cuda")[0] == "bf16"  # the CPU's flags say nothing of a GPU


def test_flags_that_do_not_name_x86_instruction_sets_refuse_nothing():
    unknown = Machine("cpu", "ARM CPU", (), torch.__version__, 2)  # no x86 flags read: not known to emulate bf16
    assert not precision.emulates_bf16(unknown)
    assert precision.emulates_bf16(Machine("cpu", "Old x86", ("sse2",), torch.__version__, 2))
    assert not precision.emulates_bf16(Machine("cpu", "Zen 5", ("sse2", "avx512_bf16"), torch.__version__, 2))


def test_int8_with_the_amx_kernels_runs_them(monkeypatch):
    amx(monkeypatch, present=True)
    assert resolve_precision("int8", LARGE) == ("int8", "int8: requested, AMX kernels")
    assert resolve_precision("int8-library", LARGE)[0] == "int8"


def test_int8_on_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(lowp_weights, "int8_available", lambda device="cpu": False)
    with pytest.raises(ConfigError, match="use precision auto or bf16"):
        resolve_precision("int8", LARGE, device="cuda")


@pytest.mark.parametrize("seconds", [
    {"fp32": 1.0, "bf16": 3.0},  # no bf16 hardware
    {"fp32": 1.0, "bf16": 0.95},  # faster, but within noise of fp32
    {"fp32": 1.0, "bf16": 0.5},
    {"fp32": 1.0, "bf16": 2.0, "int8": 1.2},
    {"fp32": 1.0, "bf16": 0.6, "int8": 0.2},
    {"fp32": 1.0, "bf16": 0.3, "int8": 0.5},
    {"fp32": 0.1, "bf16": 5.0, "int8": 0.01},
])
def test_auto_picks_the_fastest_mode_never_one_slower_than_fp32(seconds: dict[str, float]):
    mode, reason = choose(seconds, (("int8" in seconds), "no AMX"))
    eligible = {m: s for m, s in seconds.items() if m == "fp32" or s * precision.MIN_SPEEDUP <= seconds["fp32"]}
    assert seconds[mode] <= seconds["fp32"]
    assert mode == min(eligible, key=eligible.__getitem__)
    assert reason.startswith(f"{mode}: ")


def test_auto_measures_on_this_device_and_states_the_reason(monkeypatch):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch)
    calls = fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 1.8})
    assert resolve_precision("auto", LARGE) == (
        "fp32", "fp32: int8 is no candidate here (this CPU lacks amx_tile); bf16 products 1.8× slower than fp32 here")
    assert calls == [(ShapeClass.of(LARGE), ("fp32", "bf16"))]  # int8 is not a candidate without the kernels

    amx(monkeypatch, present=True)
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5, "int8": 0.2})
    mode, reason = resolve_precision("auto", build_spec("imdb", tiny=False))  # another shape class: measured
    assert mode == "int8"
    assert reason == ("int8: AMX kernels; int8 products 5.0× faster than fp32 here; "
                      "bf16 products 2.0× faster than fp32 here")


def test_a_graph_without_a_large_synapse_needs_no_calibration(monkeypatch):
    amx(monkeypatch, present=True)
    bf16_instructions(monkeypatch)
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("nothing to measure"))
    assert resolve_precision("auto", SMALL) == ("fp32", "fp32: no synapse is large enough for low-precision products")
    assert resolve_precision("bf16", SMALL)[0] == "bf16"
    mode, reason = resolve_precision("int8", SMALL)  # nothing would run in int8: the exact path, which is faster
    assert mode == "fp32" and "no synapse is large enough for int8 products" in reason
    assert resolve_precision("fp32", LARGE)[0] == "fp32"
    with pytest.raises(ConfigError, match="choose one of auto, fp32, bf16, int8, int8-library, bf16-emulated"):
        resolve_precision("fp16", LARGE)


def test_bf16_slower_than_fp32_on_a_cpu_with_bf16_instructions_runs_with_one_warning(monkeypatch):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch)
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 4.0})
    with pytest.warns(RuntimeWarning, match=r"bf16 products 4\.0× slower than fp32 here"):
        mode, reason = resolve_precision("bf16", LARGE)
    assert (mode, reason) == ("bf16", "bf16: requested; bf16 products 4.0× slower than fp32 here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", LARGE)[0] == "bf16"  # once


def test_bf16_faster_than_fp32_runs_without_a_warning(monkeypatch):
    bf16_instructions(monkeypatch)
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", LARGE) == ("bf16", "bf16: requested; bf16 products 2.0× faster than fp32 here")


def test_the_calibration_is_cached_per_machine_and_shape_class(monkeypatch, tmp_path):
    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch)
    calls = fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 2.0})
    first = resolve_precision("auto", LARGE)
    assert resolve_precision("auto", LARGE) == first and len(calls) == 1  # read back, not measured again
    (cached,) = (tmp_path / "precision").glob("*.json")
    assert cached.stem == precision.this_machine().key()
    entry = json.loads(cached.read_text())
    assert entry["shapes"][ShapeClass.of(LARGE).key()]["seconds"] == {"fp32": 1.0, "bf16": 2.0}
    assert entry["machine"]["torch"] == torch.__version__

    entry["version"] = precision.CALIBRATION_VERSION - 1  # timings of an older calibration method: measured again
    cached.write_text(json.dumps(entry))
    resolve_precision("auto", LARGE)
    assert len(calls) == 2 and json.loads(cached.read_text())["version"] == precision.CALIBRATION_VERSION

    other = Machine("cpu", "Other CPU", ("avx2", "avx512_bf16"), torch.__version__, 2)
    monkeypatch.setattr(precision, "this_machine", lambda device="cpu": other)
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.4})
    assert resolve_precision("auto", LARGE)[0] == "bf16"  # another machine: its own measurement and file
    assert {p.stem for p in (tmp_path / "precision").glob("*.json")} == {cached.stem, other.key()}


def test_machines_differing_in_flags_threads_or_torch_have_different_keys():
    base = Machine("cpu", "CPU", ("avx2",), "2.0", 2)
    assert len({base.key(), Machine("cpu", "CPU", ("avx2", "amx_int8"), "2.0", 2).key(),
                Machine("cpu", "CPU", ("avx2",), "2.1", 2).key(), Machine("cpu", "CPU", ("avx2",), "2.0", 4).key(),
                Machine("cpu", "CPU 2", ("avx2",), "2.0", 2).key()}) == 5


def test_shape_classes_round_up_and_cap_the_inputs():
    assert ShapeClass.of(build_spec("snli", tiny=False)).key() == f"64x{precision.MAX_CALIBRATION_IN}x512"
    assert ShapeClass.of(build_spec("imdb", tiny=True)).key() == "64x128x32"


def test_a_real_measurement_is_positive_and_leaves_the_random_stream_alone():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    seconds = precision.measure(ShapeClass(4, 256, 32), ("fp32", "bf16"))
    assert set(seconds) == {"fp32", "bf16"} and all(s > 0 for s in seconds.values())
    assert torch.equal(torch.rand(3), want)


@pytest.mark.realdata
def test_the_trainer_resolves_once_records_the_mode_and_a_resumed_run_keeps_it(monkeypatch, tmp_path):
    from analog_ep.train import trainer as trainer_module
    from analog_ep.train.config import apply_overrides, load_preset

    def tiny_config():
        return apply_overrides(load_preset("imdb", "smoke"), [
            "data.train_limit=64", "data.eval_limit=64", "data.max_len=32", "model.hidden=[16, 8]",
            "model.pool_queries=4", "train.batch_size=32", "train.epochs=1"])

    chosen: list[str] = []

    def resolved(requested, spec, device="cpu", fold_keys="auto"):
        chosen.append(requested)
        return ("bf16", "bf16: measured faster here") if len(chosen) == 1 else ("fp32", "fp32: measured again")

    monkeypatch.setattr(trainer_module, "resolve_precision", resolved)
    first = trainer_module.Trainer(tiny_config(), tmp_path / "run", progress=False)
    first.setup()
    estimators: list = []
    monkeypatch.setattr(trainer_module, "make_estimator", lambda name, cfg, lrs=None: estimators.append(cfg))
    first._estimator()
    assert chosen == ["auto"] and estimators[0].precision == "bf16"  # the steps run in the resolved mode
    first._save_last()
    first.close()
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (record["precision"], record["precision_reason"]) == ("bf16", "bf16: measured faster here")
    assert record["config"]["ep"]["precision"] == "auto"

    resumed = trainer_module.Trainer(tiny_config(), tmp_path / "run", resume=True, progress=False)
    resumed.setup()  # a new calibration would say fp32: the run keeps computing as it started
    assert resumed.precision == "bf16" and chosen == ["auto"]
    resumed.close()


def test_bench_and_train_default_to_auto():
    from analog_ep.cli import build_parser
    from analog_ep.train.config import RunConfig

    assert RunConfig().ep.precision == "auto"
    assert build_parser().parse_args(["bench"]).precision == "auto"


@pytest.mark.parametrize("request_, shape, says", [
    ("int8", "snli-paper", "needs our int8 kernels (AMX, or AVX2"),
    ("bf16", "imdb-tiny", "needs bf16 dot-product instructions"),
])
def test_bench_refuses_a_trap_before_measuring_and_names_its_opt_in(monkeypatch, capsys, request_, shape, says):
    from analog_ep.cli import main

    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch, present=False)
    monkeypatch.setattr("analog_ep.bench.report.machine_info", lambda: pytest.fail("nothing is measured"))
    assert main(["bench", "--shape", shape, "--precision", request_, "--in-process"]) == 2
    err = capsys.readouterr().err
    assert says in err and {"int8": "int8-library", "bf16": "bf16-emulated"}[request_] in err


def test_bench_accuracy_refuses_a_trap_and_a_comparison_of_the_exact_path_with_itself(monkeypatch, capsys):
    from analog_ep.cli import main

    amx(monkeypatch, present=False)
    bf16_instructions(monkeypatch, present=False)
    monkeypatch.setattr("analog_ep.cli.bench.compare_training", lambda *a, **k: pytest.fail("nothing is trained"))
    assert main(["bench", "--accuracy", "--shape", "imdb-cpu", "--precision", "bf16"]) == 2
    assert "bf16-emulated" in capsys.readouterr().err
    assert main(["bench", "--accuracy", "--shape", "imdb-cpu"]) == 2  # auto is the exact path here: nothing to compare
    assert "compares the exact path with a fast mode" in capsys.readouterr().err


def test_auto_on_a_cpu_without_bf16_instructions_but_with_our_avx2_kernels_weighs_int8_against_fp32(monkeypatch):
    amx(monkeypatch, present=True, which="AVX2 kernels")
    bf16_instructions(monkeypatch, present=False)
    calls = fake_timings(monkeypatch, {"fp32": 1.0, "int8": 0.4})
    assert resolve_precision("auto", LARGE) == ("int8", "int8: AVX2 kernels; int8 products 2.5× faster than fp32 here")
    assert calls == [(ShapeClass.of(LARGE), ("fp32", "int8"))]  # bf16 is emulated here: not a candidate
    assert resolve_precision("int8", LARGE) == ("int8", "int8: requested, AVX2 kernels")


def test_int8_runs_its_other_products_in_fp32_where_bf16_is_emulated(monkeypatch):
    from analog_ep.fast import native_kernels

    for flags, dtype in ((["sse2", "avx2"], torch.float32), (["sse2", "avx2", "avx512_bf16"], torch.bfloat16),
                         ([], torch.bfloat16)):  # no flags read (another architecture): nothing assumed
        monkeypatch.setattr(native_kernels, "cpu_flags", lambda flags=flags: flags)
        lowp_weights._emulates_bf16_here.cache_clear()
        try:
            assert lowp_weights.lowp_dtype("cpu") == dtype
            assert lowp_weights.lowp_dtype("meta") == torch.bfloat16  # not a CPU: its flags say nothing
        finally:
            lowp_weights._emulates_bf16_here.cache_clear()


def test_auto_keeps_the_fold_and_small_synapses_in_fp32_with_the_avx2_kernels(monkeypatch):
    """Measured on an AVX2-only CPU (docs/benchmarks.md): where the exact path folds (SNLI), it beats int8
    products; where FC-1 is small (IMDB's `cpu` preset, 160,000 weights) int8 is slower per batch."""
    amx(monkeypatch, present=True, which="AVX2 kernels")
    bf16_instructions(monkeypatch, present=False)
    monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("nothing to measure"))
    monkeypatch.setattr(folded, "resolve_fold", RESOLVE_FOLD)
    monkeypatch.setattr(folded, "_kernel_for", lambda dtype, device: object())  # the fold's kernel loads
    mode, reason = resolve_precision("auto", LARGE)  # the SNLI paper graph: d = 300 ≥ 3 × 25
    assert mode == "fp32" and reason.startswith("fp32: the exact path folds here") and "d = 300" in reason
    from analog_ep.bench.shapes import build_shape

    mode, reason = resolve_precision("auto", build_shape("imdb-cpu").spec)
    assert mode == "fp32" and "pay from 1,048,576 FC-1 weights, this graph has 160,000" in reason
    amx(monkeypatch, present=True, which="AMX kernels")  # the AMX kernels: measured against the fold as before
    fake_timings(monkeypatch, {"fp32": 1.0, "bf16": 0.5, "int8": 0.2})
    assert resolve_precision("auto", LARGE)[0] == "int8"


def test_int8_requested_where_the_exact_path_folds_runs_it_folded_unless_folding_is_off(monkeypatch):
    """int8 on our AVX2 kernels took 1.6× (snli-cpu) and 4.7× (snli-paper) the folded exact path's time: asked for
    where the exact path folds, the exact path runs, and the reason says how to get int8 (`ep.fold_keys=off`)."""
    amx(monkeypatch, present=True, which="AVX2 kernels")
    bf16_instructions(monkeypatch, present=False)
    monkeypatch.setattr(folded, "resolve_fold", RESOLVE_FOLD)
    monkeypatch.setattr(folded, "_kernel_for", lambda dtype, device: object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a redirect is the reason, not a warning
        mode, reason = resolve_precision("int8", LARGE)
    assert mode == "fp32" and "int8 requested, but the exact path folds here" in reason
    assert "set ep.fold_keys=off" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("int8", LARGE, fold_keys="off") == ("int8", "int8: requested, AVX2 kernels")
    amx(monkeypatch, present=True, which="AMX kernels")  # the AMX kernels beat the fold: int8 as asked
    assert resolve_precision("int8", LARGE)[0] == "int8"


def test_int8_requested_where_fc1_is_small_for_the_avx2_kernels_runs_with_one_warning(monkeypatch):
    """Asked for, it runs (imdb-cpu: about fp32's speed); the reason and one warning say that fp32 may be faster."""
    amx(monkeypatch, present=True, which="AVX2 kernels")
    bf16_instructions(monkeypatch, present=False)
    from analog_ep.bench.shapes import build_shape

    small = build_shape("imdb-cpu").spec
    with pytest.warns(RuntimeWarning, match="this graph has 160,000"):
        mode, reason = resolve_precision("int8", small)
    assert mode == "int8" and "not faster than fp32 here: our AVX2 kernels pay from" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_precision("int8", small)  # once per machine and shape class
        assert resolve_precision("int8", build_spec("imdb", tiny=False)) == ("int8", "int8: requested, AVX2 kernels")
