"""Spec files: reading TOML/JSON, validation listing every problem, entry resolution."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from tuned.core.args import Args
from tuned.core.space import Categorical, Int, Real, Space
from tuned.experiment.files import (
    MAX_SPEC_BYTES,
    complete_spec,
    load_spec_file,
    parse_spec_text,
    resolve_entry,
)
from tuned.experiment.spec import ExperimentSpec, SpecError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "specs"

TRAIN_PY = """
import tuned
from helper_{tag} import OFFSET

@tuned.args(lr=tuned.space.Real(1e-3, 1e-2, log=True), epochs=5, note="x")
def decorated(args, reporter):
    reporter(epoch=1, accuracy=args.lr + OFFSET)

def plain(args, reporter):
    reporter(epoch=1, accuracy=0.5)

NOT_A_FUNCTION = 3
"""


@pytest.fixture(autouse=True)
def clean_imports():
    """Undo what resolve_entry does to sys.path and sys.modules."""
    path, modules = list(sys.path), set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _module(folder: Path, tag: str) -> Path:
    """A training module train_<tag>.py that imports a sibling helper_<tag>.py."""
    _write(folder, f"helper_{tag}.py", "OFFSET = 1.0\n")
    return _write(folder, f"train_{tag}.py", TRAIN_PY.format(tag=tag))


def _problems(exc: pytest.ExceptionInfo[SpecError]) -> dict[str, str]:
    """Problems by key (the text before the first ': ')."""
    return {p.split(": ", 1)[0]: p for p in exc.value.problems}


GOOD_TOML = """
    name = "good"
    entry = "train.py:decorated"
    searcher = "rl"
    scheduler = "hyperband_stopping"
    num_trials = 12
    time_out = 60.5
    reward_attr = "acc"
    time_attr = "step"
    mode = "min"
    seed = 7
    max_concurrent = 3
    max_retries = 2
    report_timeout = 30
    start_method = "spawn"
    schedule = "0 3 * * mon-fri"

    [resources]
    num_cpus = 0.5
    num_gpus = 1

    [scheduler_options]
    max_t = 9
    grace_period = 1
    reduction_factor = 3

    [searcher_options]
    controller_batch_size = 4
    controller_lr = 5e-3

    [constants]
    epochs = 9

    [space]
    lr = {type = "real", lower = 1e-3, upper = 1e-2, log = true}
    layers = {type = "int", lower = 1, upper = 4}
    act = {type = "categorical", choices = ["relu", "tanh"]}
"""


# -- reading files -------------------------------------------------------------------------

def test_good_toml_loads_every_field_and_round_trips(tmp_path):
    spec = load_spec_file(_write(tmp_path, "good.toml", GOOD_TOML))
    assert spec.name == "good"
    assert spec.entry == "train.py:decorated"
    assert spec.workdir == str(tmp_path)
    assert (spec.num_cpus, spec.num_gpus) == (0.5, 1)
    assert spec.space == Space({"lr": Real(1e-3, 1e-2, log=True), "layers": Int(1, 4),
                                "act": Categorical("relu", "tanh")})
    assert spec.searcher_options == {"controller_batch_size": 4, "controller_lr": 5e-3}
    assert (spec.start_method, spec.report_timeout, spec.schedule) == (
        "spawn", 30, "0 3 * * mon-fri")
    assert (spec.mode, spec.seed, spec.max_concurrent, spec.max_retries) == ("min", 7, 3, 2)
    again = ExperimentSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_json_is_accepted_by_extension_and_by_content(tmp_path):
    spec = load_spec_file(_write(tmp_path, "good.toml", GOOD_TOML))
    data = spec.to_dict()
    by_ext = load_spec_file(_write(tmp_path, "a.json", json.dumps(data)))
    by_content = load_spec_file(_write(tmp_path, "b.spec", "  " + json.dumps(data)))
    assert by_ext == spec
    assert by_content == spec


def test_parse_spec_text_as_the_control_server_gets_it(tmp_path):
    text = 'entry = "t.py:f"\nnum_trials = 1\nworkdir = "code"\n'
    spec = parse_spec_text(text, "exp_a.toml", str(tmp_path))
    assert (spec.name, spec.workdir) == ("exp_a", str(tmp_path / "code"))
    as_json = parse_spec_text(json.dumps({"entry": "t.py:f", "num_trials": 1}), "b.json")
    assert (as_json.name, as_json.workdir) == ("b", None)
    with pytest.raises(SpecError) as exc:  # no folder to resolve a relative workdir against
        parse_spec_text(text, "exp_a.toml")
    assert list(_problems(exc)) == ["workdir"]
    with pytest.raises(SpecError) as exc:
        parse_spec_text("[oops", "sent.toml", str(tmp_path))
    assert exc.value.problems[0].startswith("sent.toml: TOML syntax error")


def test_json_syntax_error_names_file_and_place(tmp_path):
    path = _write(tmp_path, "bad.json", '{"name": "x",\n "entry": }')
    with pytest.raises(SpecError) as exc:
        load_spec_file(path)
    assert str(path) in str(exc.value)
    assert "line 2" in str(exc.value)


def test_name_defaults_to_stem_and_workdir_to_folder(tmp_path):
    path = _write(tmp_path / "sub", "my_exp.toml", 'entry = "t.py:f"\nnum_trials = 1\n')
    spec = load_spec_file(path)
    assert spec.name == "my_exp"
    assert spec.workdir == str(tmp_path / "sub")
    assert os.path.isabs(spec.workdir)


def test_relative_workdir_in_file_is_resolved_against_its_folder(tmp_path):
    path = _write(tmp_path / "sub", "e.toml",
                  'entry = "t.py:f"\nnum_trials = 1\nworkdir = "../code"\n')
    assert load_spec_file(path).workdir == str(tmp_path / "code")


def test_bad_spec_lists_every_problem_by_key(tmp_path):
    path = _write(tmp_path, "bad.toml", """
        entry = "train.py:decorated"
        command = ["python", "x.py"]
        searcher = "bayes"
        scheduler = "asha"
        num_trials = -3
        mode = "maximize"
        colour = "blue"
        schedule = "61 * * * *"
        start_method = "thread"
        report_timeout = 0

        [resources]
        num_tpus = 2

        [space]
        lr = {type = "float", lower = 0, upper = 1}
    """)
    with pytest.raises(SpecError) as exc:
        load_spec_file(path)
    problems = _problems(exc)
    expected = {"entry", "searcher", "scheduler", "num_trials", "mode", "colour", "schedule",
                "start_method", "report_timeout", "resources.num_tpus", "space"}
    assert expected <= set(problems), exc.value.problems
    assert "bayes" in problems["searcher"]
    assert "-3" in problems["num_trials"]
    assert "unknown key" in problems["colour"]
    assert "'float'" in problems["space"]


def test_file_without_entry_or_command_is_refused(tmp_path):
    with pytest.raises(SpecError) as exc:
        load_spec_file(_write(tmp_path, "x.toml", "num_trials = 3\n"))
    assert set(_problems(exc)) == {"entry"}


def test_resource_given_twice_is_a_problem(tmp_path):
    path = _write(tmp_path, "x.toml",
                  'entry = "t.py:f"\nnum_trials = 1\nnum_cpus = 1\n[resources]\nnum_cpus = 2\n')
    with pytest.raises(SpecError) as exc:
        load_spec_file(path)
    assert set(_problems(exc)) == {"resources.num_cpus"}


def test_toml_syntax_error_gives_line_and_column(tmp_path):
    path = _write(tmp_path, "x.toml", 'name = "a"\nnum_trials = = 3\n')
    with pytest.raises(SpecError) as exc:
        load_spec_file(path)
    message = str(exc.value)
    assert str(path) in message and "TOML" in message
    assert "line 2" in message and "column" in message


def test_size_limit(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text('entry = "t.py:f"\nnum_trials = 1\n' + "#" * MAX_SPEC_BYTES + "\n")
    with pytest.raises(SpecError) as exc:
        load_spec_file(path)
    (problem,) = exc.value.problems
    assert problem.startswith(f"{path}: ") and f"at most {MAX_SPEC_BYTES} bytes" in problem


def test_binary_and_undecodable_files_are_refused(tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'name = "a"\x00\x01\x02')
    latin = tmp_path / "latin.toml"
    latin.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    for path, words in ((binary, "binary"), (latin, "UTF-8")):
        with pytest.raises(SpecError) as exc:
            load_spec_file(path)
        (problem,) = exc.value.problems
        assert problem.startswith(f"{path}: ") and words in problem[len(str(path)):]


def test_missing_file_and_folder_are_spec_errors(tmp_path):
    for path in (tmp_path / "nope.toml", tmp_path):
        with pytest.raises(SpecError) as exc:
            load_spec_file(path)
        assert str(path) in str(exc.value)


# -- from_dict: the daemon's keys ----------------------------------------------------------

def _spec(**kw):
    return ExperimentSpec.from_dict({"name": "x", "num_trials": 1, **kw})


def test_hyperband_alias_is_normalised():
    spec = _spec(scheduler="hyperband")
    assert spec.scheduler == "hyperband_stopping"
    assert spec.to_dict()["scheduler"] == "hyperband_stopping"
    assert _spec(scheduler="hyperband_stopping").scheduler == "hyperband_stopping"
    assert _spec(scheduler="fifo").scheduler == "fifo"


def test_schedule_is_validated_by_apscheduler():
    assert _spec(schedule="*/5 * * * *").schedule == "*/5 * * * *"
    with pytest.raises(SpecError) as exc:
        _spec(schedule="0 3 * *")
    problem = _problems(exc)["schedule"]
    assert "Wrong number of fields" in problem  # APScheduler's own words
    with pytest.raises(SpecError) as exc:
        _spec(schedule=5)
    assert "schedule" in _problems(exc)


@pytest.mark.parametrize("kw, key", [
    ({"command": []}, "command"),
    ({"command": "python train.py"}, "command"),
    ({"command": ["python", 3]}, "command"),
    ({"command": [""]}, "command"),
    ({"entry": "train.py"}, "entry"),
    ({"entry": "train:fn:x"}, "entry"),
    ({"entry": "pkg.mod:"}, "entry"),
    ({"entry": "a.py:f", "command": ["python"]}, "entry"),
    ({"workdir": "relative/dir"}, "workdir"),
    ({"start_method": "forkserver"}, "start_method"),
    ({"report_timeout": -1}, "report_timeout"),
    ({"report_timeout": True}, "report_timeout"),
])
def test_launch_keys_are_validated(kw, key):
    with pytest.raises(SpecError) as exc:
        _spec(**kw)
    assert list(_problems(exc)) == [key]


def test_good_launch_keys_pass():
    spec = _spec(entry="sub/dir/train.py:fn", start_method="spawn", report_timeout=2.5,
                 workdir="/abs")
    assert (spec.entry, spec.start_method, spec.report_timeout) == (
        "sub/dir/train.py:fn", "spawn", 2.5)
    assert _spec(entry="pkg.sub.mod:train_fn").entry == "pkg.sub.mod:train_fn"
    assert _spec(command=["python", "-u", "t.py"]).command == ["python", "-u", "t.py"]
    assert _spec().start_method == "fork"  # the in-process API gives neither entry nor command


# -- resolve_entry ---------------------------------------------------------------------------

def test_resolve_file_entry_decorated_and_plain(tmp_path):
    _module(tmp_path / "code", "a")
    fn, space, constants = resolve_entry("code/train_a.py:decorated", str(tmp_path))
    assert space == Space({"lr": Real(1e-3, 1e-2, log=True)})
    assert constants == {"epochs": 5, "note": "x"}
    seen = []
    fn(Args(lr=0.5), lambda **m: seen.append(m))
    assert seen == [{"epoch": 1, "accuracy": 1.5}]  # the sibling helper was importable
    plain, space, constants = resolve_entry("code/train_a.py:plain", str(tmp_path))
    assert callable(plain) and space is None and constants == {}


def test_resolve_absolute_file_entry(tmp_path):
    path = _module(tmp_path, "b")
    fn, space, _ = resolve_entry(f"{path}:decorated", "/somewhere/else")
    assert fn.__name__ == "decorated" and space is not None


def test_resolve_dotted_entry_with_workdir(tmp_path):
    _write(tmp_path, "pkg_c/__init__.py", "")
    _write(tmp_path, "pkg_c/models/__init__.py", "")
    _write(tmp_path, "pkg_c/models/train.py", """
        import tuned
        from pkg_c.models import util

        @tuned.args(units=tuned.space.Int(8, 64), depth=3)
        def train_fn(args, reporter):
            pass
    """)
    _write(tmp_path, "pkg_c/models/util.py", "")
    fn, space, constants = resolve_entry("pkg_c.models.train:train_fn", str(tmp_path))
    assert fn.__name__ == "train_fn"
    assert space == Space({"units": Int(8, 64)})
    assert constants == {"depth": 3}


def test_resolve_errors_name_entry_and_cause(tmp_path):
    _module(tmp_path, "d")
    _write(tmp_path, "broken_d.py", "import math\nraise RuntimeError('boom at import')\n")
    _write(tmp_path, "syntax_d.py", "def f(:\n")
    _write(tmp_path, "pkg_d/__init__.py", "import no_such_dependency_d\n")
    cases = [
        ("missing_d.py:f", "file not found"),
        ("train_d.py:nope", "no attribute 'nope'"),
        ("train_d.py:NOT_A_FUNCTION", "not callable"),
        ("broken_d.py:f", "RuntimeError: boom at import"),
        ("syntax_d.py:f", "SyntaxError"),
        ("no_such_pkg_d.mod:f", "no module named 'no_such_pkg_d'"),
        ("pkg_d:f", "ModuleNotFoundError"),
        ("not an entry", "must look like"),
    ]
    for entry, words in cases:
        with pytest.raises(SpecError) as exc:
            resolve_entry(entry, str(tmp_path))
        (problem,) = exc.value.problems
        assert problem.startswith("entry: ") and words in problem, (entry, problem)


def test_missing_attribute_lists_the_functions_there(tmp_path):
    _module(tmp_path, "e")
    with pytest.raises(SpecError) as exc:
        resolve_entry("train_e.py:train", str(tmp_path))
    assert "decorated" in str(exc.value) and "plain" in str(exc.value)


def test_import_error_names_the_line(tmp_path):
    path = _write(tmp_path, "broken_f.py", "x = 1\nraise ValueError('bad')\n")
    with pytest.raises(SpecError) as exc:
        resolve_entry("broken_f.py:f", str(tmp_path))
    assert f"{path}:2" in str(exc.value)


# -- complete_spec ---------------------------------------------------------------------------

def _entry_spec(tmp_path: Path, entry: str, **kw) -> ExperimentSpec:
    return ExperimentSpec.from_dict({"name": "x", "num_trials": 2, "entry": entry,
                                     "workdir": str(tmp_path), **kw})


def test_complete_takes_space_and_constants_from_the_function(tmp_path):
    _module(tmp_path, "g")
    spec = _entry_spec(tmp_path, "train_g.py:decorated", constants={"note": "mine"})
    assert len(spec.space) == 0  # not imported yet
    done, fn = complete_spec(spec)
    assert fn.__name__ == "decorated"
    assert done.space == Space({"lr": Real(1e-3, 1e-2, log=True)})
    assert done.constants == {"epochs": 5, "note": "mine"}
    assert spec.constants == {"note": "mine"}  # the input is left as it was


def test_complete_prefers_the_space_table(tmp_path):
    _module(tmp_path, "h")
    table = {"wd": {"type": "real", "lower": 0.0, "upper": 0.1}}
    done, _ = complete_spec(_entry_spec(tmp_path, "train_h.py:decorated", space=table))
    assert done.space == Space({"wd": Real(0.0, 0.1)})


def test_complete_plain_function_needs_a_space_table(tmp_path):
    _module(tmp_path, "i")
    with pytest.raises(SpecError) as exc:
        complete_spec(_entry_spec(tmp_path, "train_i.py:plain"))
    assert exc.value.problems == ["space: the entry function is not decorated with "
                                  "@tuned.args; give a [space] table"]
    table = {"x": {"type": "int", "lower": 0, "upper": 3}}
    done, fn = complete_spec(_entry_spec(tmp_path, "train_i.py:plain", space=table))
    assert done.space == Space({"x": Int(0, 3)}) and done.constants == {}


def test_complete_command_spec(tmp_path):
    base = {"name": "c", "num_trials": 2, "command": ["python", "t.py"]}
    with pytest.raises(SpecError) as exc:
        complete_spec(ExperimentSpec.from_dict(base))
    assert list(_problems(exc)) == ["space"]
    table = {"x": {"type": "int", "lower": 0, "upper": 3}}
    done, fn = complete_spec(ExperimentSpec.from_dict({**base, "space": table}))
    assert fn is None and done.space == Space({"x": Int(0, 3)})


def test_complete_infers_hyperband_max_t_or_says_it_is_missing(tmp_path):
    _module(tmp_path, "j")
    done, _ = complete_spec(_entry_spec(tmp_path, "train_j.py:decorated",
                                        scheduler="hyperband"))
    assert done.scheduler_options["max_t"] == 5
    table = {"x": {"type": "int", "lower": 0, "upper": 3}}
    with pytest.raises(SpecError) as exc:
        complete_spec(_entry_spec(tmp_path, "train_j.py:plain", space=table,
                                  scheduler="hyperband"))
    assert list(_problems(exc)) == ["scheduler_options"]


def test_complete_checks_searcher_and_scheduler_options(tmp_path):
    _module(tmp_path, "k")
    spec = _entry_spec(tmp_path, "train_k.py:decorated", scheduler="hyperband",
                       scheduler_options={"grace_period": -1},
                       searcher_options={"colour": 1})
    with pytest.raises(SpecError) as exc:
        complete_spec(spec)
    problems = _problems(exc)
    assert set(problems) == {"searcher_options", "scheduler_options"}
    assert "grace_period" in problems["scheduler_options"]
    assert "colour" in problems["searcher_options"]


# -- the example specs -----------------------------------------------------------------------

@pytest.mark.parametrize("name, searcher, scheduler, trials, params", [
    ("tutorial_hyperband", "random", "hyperband_stopping", 100, ["lr", "wd"]),
    ("rl_simulation", "rl", "fifo", 300, ["x", "y"]),
    ("random_search", "random", "fifo", 300, ["x", "y"]),
    ("fifo", "random", "fifo", 20, ["lr", "wd"]),
])
def test_example_specs_load_and_complete(name, searcher, scheduler, trials, params):
    spec = load_spec_file(EXAMPLES / f"{name}.toml")
    assert spec.workdir == str(EXAMPLES)
    done, fn = complete_spec(spec)
    assert (done.name, done.searcher, done.scheduler, done.num_trials) == (
        name, searcher, scheduler, trials)
    assert list(done.space) == params
    assert callable(fn)


def test_example_spec_details():
    hyperband, _ = complete_spec(load_spec_file(EXAMPLES / "tutorial_hyperband.toml"))
    assert hyperband.scheduler_options == {"grace_period": 1, "reduction_factor": 3,
                                           "max_t": 10}
    rl = load_spec_file(EXAMPLES / "rl_simulation.toml")
    assert rl.searcher_options == {"controller_batch_size": 4, "controller_lr": 5e-3}
    assert load_spec_file(EXAMPLES / "fifo.toml").num_cpus == 2


@pytest.mark.parametrize("kind, canonical", [("stopping", "hyperband_stopping"),
                                             ("promotion", "hyperband_promotion")])
def test_the_tutorials_hyperband_type_is_the_canonical_scheduler(kind, canonical):
    spec = parse_spec_text(textwrap.dedent(f"""
        name = "seed"
        entry = "x.py:f"
        num_trials = 10
        scheduler = "hyperband"
        [scheduler_options]
        type = "{kind}"
        max_t = 9
        grace_period = 1
        reduction_factor = 3
    """), "seed.toml", "/tmp")
    assert spec.scheduler == canonical
    assert spec.scheduler_options == {"max_t": 9, "grace_period": 1, "reduction_factor": 3}
    assert ExperimentSpec.from_dict(spec.to_dict()).scheduler == canonical  # stored canonical
    from tuned.core.factory import make_scheduler
    from tuned.core.schedulers.hyperband import HyperbandPromotion, HyperbandStopping

    made = make_scheduler("hyperband", {"type": kind, "max_t": 9})
    assert type(made) is (HyperbandPromotion if kind == "promotion" else HyperbandStopping)


@pytest.mark.parametrize("scheduler, kind, words", [
    ("hyperband", "async", ["scheduler_options.type", "'stopping'", "'promotion'", "'async'"]),
    ("hyperband", 3, ["scheduler_options.type", "got 3"]),
    ("hyperband_stopping", "promotion", ["scheduler_options.type", "contradicts"]),
])
def test_a_bad_hyperband_type_is_refused_naming_the_choices(scheduler, kind, words):
    with pytest.raises(SpecError) as err:
        ExperimentSpec.from_dict({"name": "bad", "entry": "x.py:f", "scheduler": scheduler,
                                  "scheduler_options": {"type": kind, "max_t": 9}})
    assert all(w in str(err.value) for w in words), str(err.value)
