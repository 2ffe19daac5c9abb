"""The schedule: which kinds are logged at which step, intervals as one int or per kind, names checked early."""

from __future__ import annotations

import pytest
from _models import read_events, tiny_logger

from cnnvis_tb.kinds import ALL_KINDS, BUILTIN, DEFAULT_EVERY, DEFAULT_KINDS, Features, Kernels, Kind
from cnnvis_tb.schedule import apply_every, due_kinds, resolve_kinds


class Late(Kind):
    """A kind first logged at its interval, not at step 0."""

    name, label, every, layer_role = "late", "Late", 4, None
    at_step_zero = False

    def log(self, ctx, out, computed):
        out.text("model", f"late {ctx.step}")


def _names(kinds):
    return [k.name for k in kinds]


def test_default_kinds_and_intervals_come_from_the_registry():
    kinds = resolve_kinds(None)
    assert _names(kinds) == list(DEFAULT_KINDS) and "saliency" not in DEFAULT_KINDS and "deepdream" not in DEFAULT_KINDS
    assert {k.name: k.every for k in kinds} == {name: DEFAULT_EVERY[name] for name in DEFAULT_KINDS}
    # the intervals the README documents
    assert DEFAULT_EVERY == {"gradcam": 200, "features": 200, "kernels": 100, "actmax": 1000, "deepdream": 1000,
                             "saliency": 200, "histograms": 100, "health": 100}


def test_kinds_come_in_the_registry_order_and_a_users_kind_after_them():
    kinds = resolve_kinds(["histograms", Late(), "kernels", "gradcam"])
    assert _names(kinds) == ["gradcam", "kernels", "histograms", "late"]
    assert _names(resolve_kinds(reversed(ALL_KINDS))) == list(BUILTIN)
    assert _names(resolve_kinds("features")) == ["features"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_built_in_kind_is_due_at_multiples_of_its_interval(kind):
    (k,) = resolve_kinds([kind])
    apply_every({kind: 3}, [k])
    due = [step for step in range(10) if due_kinds([k], step)]
    assert due == ([0, 3, 6, 9] if BUILTIN[kind].at_step_zero else [3, 6, 9])


def test_due_leaves_out_kinds_not_at_step_zero_and_those_already_logged():
    kinds = resolve_kinds(["kernels", "actmax", Late()])
    apply_every(2, kinds)
    assert _names(due_kinds(kinds, 0)) == ["kernels"]  # actmax and Late start at their interval
    assert _names(due_kinds(kinds, 1)) == []
    assert _names(due_kinds(kinds, 2)) == ["kernels", "actmax", "late"]
    assert _names(due_kinds(kinds, 2, {"kernels": 2})) == ["actmax", "late"]  # logged at this step already
    assert _names(due_kinds(kinds, 4, {"kernels": 2})) == ["kernels", "actmax", "late"]


def test_one_int_for_every_kind_and_a_mapping_over_the_defaults():
    kinds = resolve_kinds(["gradcam", "kernels"])
    apply_every(7, kinds)
    assert [k.every for k in kinds] == [7, 7]
    kinds = resolve_kinds(["gradcam", "kernels"])
    apply_every({"kernels": 3, "actmax": 5}, kinds)  # a built-in kind that is not logged may be named
    assert [k.every for k in kinds] == [DEFAULT_EVERY["gradcam"], 3]
    kinds = resolve_kinds(["gradcam"])
    apply_every(None, kinds)
    assert kinds[0].every == DEFAULT_EVERY["gradcam"]


def test_a_kind_built_with_its_own_every_keeps_it_over_one_int(tmp_path):
    kinds = resolve_kinds([Features(every=7), "kernels", Late(every=5)])
    apply_every(3, kinds)
    assert {k.name: k.every for k in kinds} == {"features": 7, "kernels": 3, "late": 5}
    with tiny_logger(tmp_path, kinds=[Features(every=7), Kernels(), Late()], every=2) as vis:
        assert vis.every == {"features": 7, "kernels": 2, "late": 2}
        assert vis.due(0) == ("features", "kernels") and vis.due(14) == ("features", "kernels", "late")
    # a mapping names the kind explicitly: it wins over the kind's own interval
    with tiny_logger(tmp_path, kinds=[Features(every=7)], every={"features": 4}) as vis:
        assert vis.every == {"features": 4}


@pytest.mark.parametrize("call, pattern", [
    (lambda: resolve_kinds(["gradcam", "kernel"]), r"unknown kind 'kernel' \(did you mean 'kernels'\?\)"),
    (lambda: resolve_kinds(["featuers"]), r"unknown kind 'featuers' \(did you mean 'features'\?\)"),
    (lambda: resolve_kinds(["zzz"]), r"unknown kind 'zzz'; expected some of \('gradcam', "),
    (lambda: apply_every({"histogram": 3}, resolve_kinds(["histograms"])),
     r"unknown kind 'histogram' \(did you mean 'histograms'\?\)"),
    (lambda: apply_every({"lat": 3}, resolve_kinds([Late()])), r"unknown kind 'lat' \(did you mean 'late'\?\)"),
    (lambda: resolve_kinds(["kernels", Kernels()]), r"kinds names 'kernels' twice"),
    (lambda: resolve_kinds([]), r"kinds is empty"),
], ids=["kernel", "featuers", "no-match", "every-histogram", "every-custom", "twice", "empty"])
def test_unknown_and_repeated_names_fail_with_close_matches(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_type_errors_name_what_was_given():
    with pytest.raises(TypeError, match=r"kinds holds the class Late; pass an instance: Late\(\)"):
        resolve_kinds([Late])
    with pytest.raises(TypeError, match=r"every must be a positive int or a mapping"):
        apply_every(True, resolve_kinds(["kernels"]))
    with pytest.raises(TypeError, match=r"every\['kernels'\] must be a positive int"):
        apply_every({"kernels": "10"}, resolve_kinds(["kernels"]))


def test_the_logger_names_kinds_it_does_not_log(tmp_path):
    with tiny_logger(tmp_path, kinds=["kernels"]) as vis:
        with pytest.raises(ValueError, match=r"kind 'gradcam' is not logged by this VisLogger \(kinds=\['kernels'\]\)"):
            vis.kind("gradcam")
        with pytest.raises(ValueError, match=r"unknown kind 'kernel' \(did you mean 'kernels'\?\)"):
            vis.log_now(0, kinds=["kernel"])
        assert vis.kind("kernels").name == "kernels"


def test_schedule_per_kind_and_step_zero(tmp_path):
    every = {"kernels": 2, "gradcam": 3, "histograms": 5, "features": 4, "actmax": 6}
    with tiny_logger(tmp_path, every=every) as vis:
        assert vis.due(0) == ("gradcam", "features", "kernels", "histograms", "health")  # actmax: at its interval
        for step in range(7):
            vis.step(step)
            vis.step(step)  # a second call at the same step (gradient accumulation) logs nothing more
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("cnnvis/kernels/stem.0/grid")] == [0, 2, 4, 6]
    assert [e.step for e in acc.Images("cnnvis/gradcam/body/probe_000")] == [0, 3, 6]
    assert [e.step for e in acc.Images("cnnvis/features/body.3/probe_000")] == [0, 4]
    assert [e.step for e in acc.Images("cnnvis/actmax/body.3/channels")] == [6]
    assert [e.step for e in acc.Histograms("cnnvis/histograms/head/weight")] == [0, 5]


def test_default_schedule(tmp_path):
    with tiny_logger(tmp_path) as vis:
        assert vis.kinds == DEFAULT_KINDS
        assert vis.every == {"kernels": 100, "features": 200, "gradcam": 200, "actmax": 1000, "histograms": 100,
                             "health": 100}
        assert vis.due(100) == ("kernels", "histograms", "health") and vis.due(101) == ()


def test_schedule_starts_activation_maximization_at_its_interval(tmp_path):
    with tiny_logger(tmp_path) as vis:  # the default schedule
        assert vis.due(0) == ("gradcam", "features", "kernels", "histograms", "health")
        assert "actmax" not in vis.due(200) and vis.due(1000) == vis.kinds
    with tiny_logger(tmp_path / "every", every={"actmax": 3}, kinds=["actmax", "kernels"]) as vis:
        logged = [s for s in range(7) if vis.step(s)]
        vis.log_now(7, kinds=["actmax"])  # asked for explicitly: logged whatever the schedule says
    acc = read_events(tmp_path / "every")
    assert [e.step for e in acc.Images("cnnvis/actmax/" + vis.layers["actmax"][0] + "/channels")] == [3, 6, 7]
    assert logged == [0, 3, 6]  # kernels at 0 (every 100), actmax at 3 and 6
