"""The benchmark harness's run control: ``--resume`` keeps the cases a CSV holds in full on the
same device and measures the rest; ``--warm-only`` runs every provider once and writes nothing.
CPU only, with the quick budget."""
from __future__ import annotations

import dataclasses

import torch

from benchmarks import harness
from benchmarks import __main__ as cli


def _info() -> harness.RunInfo:
    return harness.RunInfo.create(torch.device("cpu"), quick=True)


def _rows(info: harness.RunInfo, op: str, label: str, pairs) -> list[harness.Row]:
    case = harness.Case(shape=(1,))
    t = harness.Timing(1.0, 1.0, 1.0)
    return [dataclasses.replace(info.row(op, p, m, case, t, 1.0, 0.0), shape=label)
            for p, m in pairs]


def test_complete_cases_keeps_only_whole_cases_of_this_device_and_version(tmp_path):
    info = _info()
    everything = [(p, m) for p in harness.providers("cpu") for m in harness.MODES]
    whole = _rows(info, "cas", "A", everything)
    partial = _rows(info, "cas", "B", everything[:-1])  # one provider x mode missing
    other = [dataclasses.replace(r, shape="C", device="another device")
             for r in _rows(info, "cas", "C", everything)]
    stale = _rows(info, "cas", "D", everything)  # no longer among the op's cases
    older = [dataclasses.replace(r, version="0.0.1") for r in _rows(info, "cas", "E", everything)]
    path = tmp_path / "cas.csv"
    harness.write_csv(path, whole + partial + other + stale + older)
    rows, done = harness.complete_cases(path, info, ["A", "B", "C", "E"])
    assert done == {"A"}  # E: another pyprune version's rows are measured again
    assert [(r.provider, r.mode) for r in rows] == everything and {r.shape for r in rows} == {"A"}
    assert harness.complete_cases(tmp_path / "missing.csv", info, ["A"]) == ([], set())


def test_resume_measures_only_the_missing_cases(tmp_path, monkeypatch, capsys):
    op = "cas"
    cases = [c for c in harness.discover_ops()[op].CASES if c.quick]
    assert len(cases) >= 2
    measured: list[str] = []
    real = harness.run_case

    def counting(info, name, setup, case, progress):
        measured.append(case.label)
        return real(info, name, setup, case, progress)

    monkeypatch.setattr(harness, "run_case", counting)
    args = ["--op", op, "--quick", "--device", "cpu", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["benchmarks", *args])
    cli.main()
    assert measured == [c.label for c in cases]
    csv_path = next(tmp_path.glob(f"*/{op}.csv"))
    # Drop the last case, as a run stopped by its time limit would have it.
    kept = [r for r in harness.read_csv(csv_path) if r.shape != cases[-1].label]
    harness.write_csv(csv_path, kept)
    measured.clear()
    monkeypatch.setattr("sys.argv", ["benchmarks", *args, "--resume"])
    cli.main()
    assert measured == [cases[-1].label]
    assert {r.shape for r in harness.read_csv(csv_path)} == {c.label for c in cases}
    assert "resuming" in capsys.readouterr().out


def test_a_stopped_run_keeps_the_stored_rows_of_the_cases_it_did_not_reach(tmp_path, monkeypatch):
    """A run stopped by a time limit after its first case: that case's rows are this run's, the
    other cases keep their stored rows (another version's), and none is lost."""
    op = "cas"
    cases = [c for c in harness.discover_ops()[op].CASES if c.quick]
    assert len(cases) >= 2
    args = ["benchmarks", "--op", op, "--quick", "--device", "cpu", "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", args)
    cli.main()
    csv_path = next(tmp_path.glob(f"*/{op}.csv"))
    old = [dataclasses.replace(r, version="0.0.1") for r in harness.read_csv(csv_path)]
    harness.write_csv(csv_path, old)
    real = harness.run_case
    count = []

    def stopping(info, name, setup, case, progress):
        if count:
            raise KeyboardInterrupt  # as the time limit's signal would stop it
        count.append(case.label)
        return real(info, name, setup, case, progress)

    monkeypatch.setattr(harness, "run_case", stopping)
    try:
        cli.main()
    except KeyboardInterrupt:
        pass
    rows = harness.read_csv(csv_path)
    assert [(r.shape, r.provider, r.mode) for r in rows] == [(r.shape, r.provider, r.mode)
                                                              for r in old]
    first = cases[0].label
    assert {r.version for r in rows if r.shape == first} == {harness.RunInfo.create(
        torch.device("cpu"), quick=True).version}
    assert {r.version for r in rows if r.shape != first} == {"0.0.1"}


def test_warm_only_runs_every_provider_and_writes_nothing(tmp_path, monkeypatch):
    op = "cas"
    calls: list[tuple[str, str]] = []
    real = harness.setup_of

    def spying(name, module):
        setup = real(name, module)

        def wrapped(case, provider, mode, device):
            calls.append((provider, mode))
            return setup(case, provider, mode, device)

        return wrapped

    monkeypatch.setattr(harness, "setup_of", spying)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["benchmarks", "--op", op, "--quick", "--device", "cpu",
                                     "--warm-only", "--out", str(tmp_path)])
    cli.main()
    quick = [c for c in harness.discover_ops()[op].CASES if c.quick]
    assert len(calls) == len(quick) * len(harness.MODES) * len(harness.providers("cpu"))
    assert not list(tmp_path.rglob("*.csv"))
