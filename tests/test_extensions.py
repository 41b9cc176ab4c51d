"""Own code by `_target_`: a user's Callback, LightningDataModule and LightningModule train through the real train.py
(the classes of examples/), and a target that is not a class of the group's kind is refused with one line before
anything is built."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import FAST, ROOT, compose_config, run_train
from tunelab.callbacks import build_callbacks
from tunelab.char_tokenizer import build_char_tokenizer
from tunelab.config import ConfigError, validate_config
from tunelab.model import build_model
from tunelab.kernels import model_loss
from tunelab.modules.base import build_module

EXAMPLES = ROOT / "examples"


@pytest.fixture
def webhook():
    """A loopback HTTP server that keeps the JSON body of every POST it gets."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/tunelab", received
    server.shutdown()
    server.server_close()


SAVES_TO_LOG_DIR = """
from pathlib import Path

import lightning.pytorch as pl


class SaveToLogDir(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        (Path(trainer.log_dir or ".") / "saved_by_callback.txt").write_text(str(trainer.global_step))
"""


def test_own_callback_and_data_module_train_through_train_py(tmp_path, dataset_cache, webhook):
    url, received = webhook
    run_dir = tmp_path / "run"
    own = tmp_path / "own"
    own.mkdir()
    (own / "saves_to_log_dir.py").write_text(SAVES_TO_LOG_DIR)  # a common pattern: save beside each checkpoint
    result = run_train([*FAST, "data._target_=sort_data.SortLettersDataModule",
                        "+callbacks.notify._target_=notify.NotifyOnFinish", f"+callbacks.notify.url={url}",
                        "+callbacks.notify.threshold=100", "+callbacks.save._target_=saves_to_log_dir.SaveToLogDir"],
                       run_dir, dataset_cache, extra_env={"PYTHONPATH": f"{EXAMPLES}:{own}"})

    # trainer.log_dir is the run dir under the MLflow logger too, where Lightning's answer is None
    assert (run_dir / "saved_by_callback.txt").read_text() == "20" and not (ROOT / "saved_by_callback.txt").exists()

    # the user's DataModule, given the tokenizer, fed the run in place of tunelab's
    assert "sort_data: 380 train / 20 val rows" in result.stdout and "val examples" not in result.stdout
    objective = json.loads((run_dir / "objective.json").read_text())
    threshold, finished = received
    # the base model's validation before the first step (validate_at_start) is the first one the callback sees
    assert threshold["event"] == "threshold" and threshold["step"] == 0 and threshold["value"] < 100
    assert finished["event"] == "finished" and finished["step"] == 20
    assert finished["best"] == pytest.approx(objective["objective"]) and finished["metric"] == "val/loss"
    assert finished["run_id"] == objective["mlflow_run_id"]


def test_own_lightning_module_trains_with_its_own_loss(tmp_path, dataset_cache):
    run_dir = tmp_path / "run"
    run_train([*FAST, "module._target_=focal_loss.FocalLossModule", "+module.gamma=2.0", "trainer.log_every_n_steps=5"],
              run_dir, dataset_cache, extra_env={"PYTHONPATH": str(EXAMPLES)})

    objective = json.loads((run_dir / "objective.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = objective["mlflow_run_id"]
    focal = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    cross_entropy = {m.step: m.value for m in client.get_metric_history(run_id, "train/cross_entropy")}
    # train/loss is the focal loss the module optimised: below the same step's cross-entropy wherever gamma > 0
    assert len(focal) >= 3 and focal.keys() == cross_entropy.keys()
    assert all(0 < focal[step] < cross_entropy[step] for step in focal)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_metric_history(run_id, "val/loss")  # validation is still CausalLMModule's


NOTIFY = ["+callbacks.notify._target_=notify.NotifyOnFinish", "+callbacks.notify.url=http://127.0.0.1:9/"]
SHELL = "{_target_: os.system, _args_: ['touch {tmp}/pwned']}"
# (overrides, what the one line says)
REFUSED = [
    (["+callbacks.shell._target_=os.system"], "callbacks.shell._target_=os.system is a function, not a class: "
                                              "callbacks.shell takes a subclass of lightning.pytorch.Callback"),
    (["+callbacks.shell._target_=builtins.eval"], "callbacks.shell._target_=builtins.eval is a function, not a class"),
    (["+callbacks.build._target_=tunelab.callbacks.build_callbacks"],
     "callbacks.build._target_=tunelab.callbacks.build_callbacks is a function, not a class"),
    (["logger._target_=subprocess.Popen"],
     "logger._target_=subprocess.Popen is not a subclass of lightning.pytorch.loggers.Logger"),
    (["module._target_=sort_data.SortLettersDataModule"],
     "module._target_=sort_data.SortLettersDataModule is not a subclass of lightning.pytorch.LightningModule"),
    (["data._target_=notify.NotifyOnFinish"],
     "data._target_=notify.NotifyOnFinish is not a subclass of lightning.pytorch.LightningDataModule"),
    (["+callbacks.mine._target_=mycallbacks.Hello"], "callbacks.mine._target_=mycallbacks.Hello: there is no module "
                                                     "mycallbacks: fix the module path, or put the directory"),
    (["+callbacks.mine._target_=notify.NotifyOnFinnish"],
     "callbacks.mine._target_=notify.NotifyOnFinnish: notify has no NotifyOnFinnish"),
    (["+callbacks.mine._target_=broken_callbacks.Hello"],
     "callbacks.mine._target_=broken_callbacks.Hello: importing broken_callbacks failed: "
     "ModuleNotFoundError: No module named 'not_installed_dependency'"),
    ([*NOTIFY, "+callbacks.notify.ur1=http://127.0.0.1:9/"],
     "callbacks.notify._target_=notify.NotifyOnFinish: got an unexpected keyword argument 'ur1'"),
    ([*NOTIFY, f"+callbacks.notify.threshold={SHELL}"],
     "callbacks.notify.threshold._target_=os.system: tunelab builds only the callbacks.notify._target_ class"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[overrides[-1] for overrides, _ in REFUSED])
def test_a_target_that_is_not_a_class_of_the_group_is_refused_in_one_line(overrides, message, tmp_path, dataset_cache,
                                                                          monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    (tmp_path / "broken_callbacks.py").write_text("import not_installed_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config([override.replace("{tmp}", str(tmp_path)) for override in overrides], tmp_path, dataset_cache)
    with pytest.raises(ConfigError) as refused:
        validate_config(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_builders_refuse_a_nested_target_without_validation(tmp_path, dataset_cache, monkeypatch):
    """The check runs in the builder too: a builder called on its own never calls a `_target_` nested in arguments."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    cfg = compose_config([*NOTIFY, f"+callbacks.notify.threshold={SHELL.replace('{tmp}', str(tmp_path))}"], tmp_path,
                         dataset_cache)
    with pytest.raises(ConfigError, match="callbacks.notify.threshold._target_=os.system"):
        build_callbacks(cfg.callbacks)
    assert not (tmp_path / "pwned").exists()


def test_a_plain_lightning_module_is_given_only_the_arguments_it_names(tmp_path, dataset_cache, monkeypatch):
    """Any LightningModule taking the model and the optim config will do: tunelab's loss and adapter_only_checkpoints
    go only to a constructor that names them."""
    (tmp_path / "plain_module.py").write_text(
        "import lightning.pytorch as pl\n\n"
        "class PlainModule(pl.LightningModule):\n"
        "    def __init__(self, model, optim, lr_scale: float = 1.0):\n"
        "        super().__init__()\n"
        "        self.model, self.optim, self.lr_scale = model, optim, lr_scale\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config(["module._target_=plain_module.PlainModule", "+module.lr_scale=0.5"], tmp_path, dataset_cache)
    validate_config(cfg)
    model = build_model(cfg.model, cfg.precision, build_char_tokenizer())
    module = build_module(cfg.module, model, cfg.optim, adapter_only_checkpoints=False, loss=model_loss)
    assert type(module).__name__ == "PlainModule" and module.model is model and module.lr_scale == 0.5
