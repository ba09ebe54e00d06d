"""The plugin manager, registries and in-process plugins."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from conftest import job

from mlora_core.config.schema import load_config
from mlora_core.config.validation import validate_config
from mlora_core.errors import ConfigError, PluginError, UnknownComponentError
from mlora_core.plugin_api.hookspecs import hookimpl
from mlora_core.plugin_api.host import REGISTRIES, create_plugin_manager
from mlora_core.plugin_api.protocols import SplitDataset
from mlora_core.plugin_api.scheduling import JobView, StepBudget, StepPlan
from mlora_core.training.engine import run


class LastFirstScheduler:
    """Takes only the job that was admitted last (a strategy the built-ins lack)."""

    calls: list[list[str]] = []

    def __init__(self, config) -> None:
        self.config = config

    def plan(self, jobs: Sequence[JobView], budget: StepBudget) -> StepPlan:
        chosen = max(jobs, key=lambda j: j.order)
        LastFirstScheduler.calls.append(sorted(j.name for j in jobs))
        return [(chosen.name, chosen.micro_batch_size)]


class EveryOtherLoader:
    """Alpaca data, keeping every other record."""

    loaded: list[str] = []

    def __init__(self) -> None:
        from mlora_data.alpaca import AlpacaLoader

        self.inner = AlpacaLoader()

    def validate(self, config):
        return self.inner.validate(config)

    def load(self, config, tokenizer, seed) -> SplitDataset:
        data = self.inner.load(config, tokenizer, seed)
        EveryOtherLoader.loaded.append(config.path)
        return SplitDataset(train=data.train[::2], eval=data.eval)


class TestPlugin:
    __name__ = "test_plugin"

    @hookimpl
    def mlora_register_schedulers(self, register):
        register("last_first", LastFirstScheduler)

    @hookimpl
    def mlora_register_datasets(self, register):
        register("every_other", EveryOtherLoader)


def test_builtins_register_through_entry_points():
    host = create_plugin_manager(autoload=False)
    infos = {p.name: p for p in host.plugins()}
    for name in ("decoders", "lora", "schedulers", "data", "tensorboard", "console"):
        assert infos[name].distribution == "mlora-trainer"
    assert "llama" in host.backends and "lora" in host.adapters and "trivial" in host.schedulers
    assert "alpaca" in host.data_loaders and {"tensorboard", "console"} <= set(host.monitors)
    families = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite")
    assert all(host.backends.get(name).plugin == "decoders" for name in families)


def test_in_process_plugin_scheduler_and_loader_are_used(make_config, data_dir):
    LastFirstScheduler.calls.clear()
    EveryOtherLoader.loaded.clear()
    host = create_plugin_manager(autoload=False, extra=[TestPlugin()])
    jobs = [job("a", data_dir / "a.jsonl", max_steps=2), job("b", data_dir / "b.jsonl", max_steps=2)]
    jobs[1]["data"]["type"] = "every_other"
    config = load_config(make_config(jobs, scheduler={"type": "last_first"}))
    summary = run(config, host)
    assert [j["status"] for j in summary["jobs"]] == ["completed", "completed"]
    assert EveryOtherLoader.loaded == [str(data_dir / "b.jsonl")]
    # last_first runs b alone until it finishes, then a: 2 steps x 2 micro-batches each.
    assert LastFirstScheduler.calls == [["a", "b"]] * 4 + [["a"]] * 4
    assert host.distribution_of("test_plugin")[0] == "(in-process)"


def test_duplicate_name_names_both_plugins():
    class Clash:
        __name__ = "clash"

        @hookimpl
        def mlora_register_schedulers(self, register):
            register("trivial", LastFirstScheduler)

    host = create_plugin_manager(autoload=False, extra=[Clash()])
    with pytest.raises(PluginError, match=r"duplicate scheduler name 'trivial'.*'schedulers'.*'clash'"):
        _ = host.schedulers


def test_unknown_name_lists_known_names(host):
    with pytest.raises(UnknownComponentError, match=r"unknown scheduler 'foo'; known: fast_fit, optimal_fit, trivial"):
        host.schedulers.get("foo")


def test_unknown_name_in_config_fails_validation(make_config, data_dir, host):
    config = load_config(make_config([job("a", data_dir / "a.jsonl")], scheduler={"type": "foo"}))
    known = "fast_fit, optimal_fit, trivial"
    with pytest.raises(ConfigError, match=rf"scheduler.type: unknown scheduler 'foo'; known: {known}"):
        validate_config(config, host)


def test_misspelled_hook_fails_loudly():
    class Typo:
        __name__ = "typo"

        @hookimpl
        def mlora_register_schedulerz(self, register):  # not a hook
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        create_plugin_manager(autoload=False, extra=[Typo()])


def test_blocked_plugin_does_not_load(monkeypatch):
    monkeypatch.setenv("MLORA_DISABLED_PLUGINS", "tensorboard")
    host = create_plugin_manager(autoload=False)
    assert "tensorboard" not in host.monitors
    assert "console" in host.monitors


def test_event_hooks_fire_in_order(make_config, data_dir):
    """Every event reaches a plugin, in the documented order, with the documented arguments."""
    events: list[tuple] = []

    class Recorder:
        __name__ = "recorder"

        @hookimpl
        def mlora_on_train_start(self, run):
            events.append(("start", tuple(run["jobs"])))

        @hookimpl
        def mlora_on_step_end(self, run, step, metrics, run_metrics):
            assert set(run_metrics) >= {"step_time_s", "rows", "tokens", "padding_fraction"}
            events.append(("step", step, tuple(sorted((job, int(m["step"])) for job, m in metrics.items()))))

        @hookimpl
        def mlora_on_evaluation(self, run, step, phase, results):
            events.append(("eval", phase, step, tuple(sorted((job, int(m["step"])) for job, m in results.items()))))

        @hookimpl
        def mlora_on_job_end(self, run, job, result):
            events.append(("job_end", job, result["status"]))

        @hookimpl
        def mlora_on_train_end(self, run, summary):
            events.append(("end", len(summary["jobs"])))

    host = create_plugin_manager(autoload=False, extra=[Recorder()])
    # a: 1 optimizer step of 2 micro-batches; b: 2 optimizer steps of 1 micro-batch each
    jobs = [
        job("a", data_dir / "a.jsonl", max_steps=1),
        job("b", data_dir / "b.jsonl", max_steps=2, batch_size=2, micro_batch_size=2),
    ]
    run(load_config(make_config(jobs)), host)
    assert events == [
        ("start", ("a", "b")),
        ("eval", "before", 0, (("a", 0), ("b", 0))),
        ("step", 1, (("b", 1),)),  # a only accumulated its first micro-batch
        ("step", 2, (("a", 1), ("b", 2))),
        ("eval", "after", 2, (("a", 1),)),
        ("job_end", "a", "completed"),
        ("eval", "after", 2, (("b", 2),)),
        ("job_end", "b", "completed"),
        ("end", 2),
    ]


def test_every_registry_kind_has_a_hook():
    from mlora_core.plugin_api import hookspecs

    for kind in REGISTRIES:
        assert callable(getattr(hookspecs, kind.hook)), kind


def test_a_scheduler_that_plans_nothing_fails_clearly(make_config, data_dir):
    from mlora_core.errors import MloraError

    class Idle:
        def __init__(self, config) -> None:
            pass

        def plan(self, jobs, budget):
            return []

    class IdlePlugin:
        __name__ = "idle"

        @hookimpl
        def mlora_register_schedulers(self, register):
            register("idle", Idle)

    host = create_plugin_manager(autoload=False, extra=[IdlePlugin()])
    config = load_config(make_config([job("a", data_dir / "a.jsonl")], scheduler={"type": "idle"}))
    with pytest.raises(MloraError, match="scheduler 'idle' planned nothing"):
        run(config, host)


# --- broken third-party plugins -----------------------------------------------------------
# Real distributions (a .dist-info with entry_points.txt and a module) written to a temp dir
# on sys.path, so importlib.metadata finds them as installed: in-process, without pip.
# tests/test_plugin_example_install.py does the same through pip and the `mlora` command.

BROKEN = {
    "mlora-broken-import": ("broken_import", "import not_a_module_anywhere\n"),
    "mlora-bad-signature": (
        "bad_signature",
        "from mlora_core.plugin_api.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef mlora_register_adapters(register, colour):\n    register('shiny', object)\n",
    ),
    "mlora-raising-hook": (
        "raising_hook",
        "from mlora_core.plugin_api.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef mlora_register_adapters(register):\n    import not_a_module_either\n\n"
        "@hookimpl\ndef mlora_register_schedulers(register):\n"
        "    from mlora_schedulers.trivial import TrivialScheduler\n    register('still_fine', TrivialScheduler)\n",
    ),
}


def install_fake_distributions(root, monkeypatch, dists: dict[str, tuple[str, str]]) -> None:
    """Write each distribution (dist name -> (module, source)) under ``root`` and put it on sys.path."""
    import sys

    for dist, (module, source) in dists.items():
        unique = f"{module}_{abs(hash(str(root))) % 10**8}"
        (root / f"{unique}.py").write_text(source)
        info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[mlora]\n{module} = {unique}\n")
        monkeypatch.delitem(sys.modules, unique, raising=False)
    monkeypatch.syspath_prepend(str(root))


def test_broken_third_party_plugins_are_skipped_and_named(tmp_path, monkeypatch, make_config, data_dir):
    (tmp_path / "site").mkdir()
    install_fake_distributions(tmp_path / "site", monkeypatch, BROKEN)
    with pytest.warns(UserWarning) as caught:
        host = create_plugin_manager()
        assert "still_fine" in host.schedulers  # builds the registries: the raising hook is found now
    messages = "\n".join(str(w.message) for w in caught)
    assert "'broken_import' from distribution mlora-broken-import 0.1.0 (import failed: ModuleNotFoundError" in messages
    assert "'bad_signature' from distribution mlora-bad-signature 0.1.0 (bad hook:" in messages
    assert "'raising_hook' from distribution mlora-raising-hook 0.1.0 (mlora_register_adapters raised" in messages
    assert sorted(f.distribution for f in host.failed) == sorted(BROKEN)

    # A config that uses only working plugins validates; one that names a missing component
    # fails with the broken plugins and their errors in the message.
    validate_config(load_config(make_config([job("a", data_dir / "a.jsonl")])), host)
    bad = job("a", data_dir / "a.jsonl", adapter={"type": "shiny"})
    with pytest.raises(ConfigError) as info:
        validate_config(load_config(make_config([bad])), host)
    assert "jobs[0].adapter.type: unknown adapter type 'shiny'; known: lora, qlora" in str(info.value)
    assert "(plugins that failed to load, which may provide it: plugin '" in str(info.value)
    assert "plugin 'broken_import' from distribution mlora-broken-import 0.1.0 (import failed:" in str(info.value)
    assert "plugin 'bad_signature' from distribution mlora-bad-signature 0.1.0 (bad hook:" in str(info.value)


def test_autoload_and_named_plugins_can_be_disabled(tmp_path, monkeypatch, recwarn):
    (tmp_path / "site").mkdir()
    install_fake_distributions(tmp_path / "site", monkeypatch, BROKEN)
    monkeypatch.setenv("MLORA_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert create_plugin_manager().failed == []
    monkeypatch.delenv("MLORA_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("MLORA_DISABLED_PLUGINS", "broken_import,bad_signature")
    host = create_plugin_manager()
    assert "still_fine" in host.schedulers
    assert [f.name for f in host.failed] == ["raising_hook"]
    assert "broken_import" not in {p.name for p in host.plugins()}
    assert not [w for w in recwarn if "broken_import" in str(w.message)]


def test_a_monitor_with_a_misspelt_event_method_is_refused(make_config, data_dir):
    """A monitor is registered as a hook implementation, so a typo'd event fails loudly, not silently."""
    from mlora_core.errors import PluginError

    class Typo:
        def __init__(self, output_dir, resume=False):
            pass

        @hookimpl
        def mlora_on_stepend(self, step):
            pass

        def close(self):
            pass

    class Plugin:
        __name__ = "typo_monitor"

        @hookimpl
        def mlora_register_monitors(self, register):
            register("typo", Typo)

    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=1)], monitor={"typo": {}}))
    with pytest.raises(PluginError, match="monitor:typo.*mlora_on_stepend"):
        run(config, host)
    assert not [name for name, _ in host.pm.list_name_plugin() if name.startswith("monitor:")]  # not left behind


def test_monitors_hear_each_event_in_config_order_before_plugins(make_config, data_dir):
    heard: list[str] = []

    def recorder(label):
        class Recorder:
            def __init__(self, output_dir, resume=False):
                pass

            @hookimpl
            def mlora_on_train_start(self):
                heard.append(label)

            def close(self):
                pass

        return Recorder

    class Plugin:
        __name__ = "recorders"

        @hookimpl
        def mlora_register_monitors(self, register):
            register("m_b", recorder("m_b"))
            register("m_a", recorder("m_a"))

        @hookimpl
        def mlora_on_train_start(self):
            heard.append("plugin")

    host = create_plugin_manager(autoload=False, extra=[Plugin()])
    config = load_config(make_config([job("a", data_dir / "a.jsonl", max_steps=1)], monitor={"m_b": {}, "m_a": {}}))
    run(config, host)
    assert heard == ["m_b", "m_a", "plugin"]
