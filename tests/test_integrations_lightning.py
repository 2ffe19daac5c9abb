"""The PyTorch Lightning callback, run by a real ``lightning.Trainer`` on the CPU for a few steps."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _models import TinyCNN, make_batch, read_events

L = pytest.importorskip("lightning", reason="the Lightning integration needs `pip install lightning`")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from cnnvis_tb.integrations.lightning import CnnVisCallback  # noqa: E402

STEPS = 6


class LitTiny(L.LightningModule):
    """TinyCNN as a LightningModule whose forward gives class scores (what the callback runs on the probe)."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepRecorder(L.Callback):
    """Records the trainer's global step after each batch, and whether the shared writer is still open at
    the end of fitting (it runs after CnnVisCallback, whose on_fit_end closes its VisLogger)."""

    def __init__(self):
        self.steps = []
        self.writer_open_at_fit_end = None

    def on_train_batch_end(self, trainer, *args):
        self.steps.append(trainer.global_step)

    def on_fit_end(self, trainer, pl_module):
        if isinstance(trainer.logger, TensorBoardLogger):
            self.writer_open_at_fit_end = trainer.logger.experiment.all_writers is not None


def _loader():
    x, y = make_batch(0, n=32)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _fit(callbacks, logger, root, *, model=None, **trainer_options):
    options = {"accelerator": "cpu", "devices": 1, **trainer_options}
    trainer = L.Trainer(max_steps=STEPS, logger=logger, callbacks=callbacks, default_root_dir=root,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, **options)
    trainer.fit(model or LitTiny(), _loader())
    return trainer


def _callback(**options):
    probe, labels = make_batch(99, n=2)
    options.setdefault("kinds", ["kernels", "histograms"])
    return CnnVisCallback(probe=probe, probe_labels=labels, strict=True, **options)


def _image_steps(acc, tag):
    return [e.step for e in acc.Images(tag)]


def test_logs_through_the_trainers_tensorboard_logger(tmp_path):
    vis = _callback(every={"kernels": 2, "histograms": 2, "gradcam": 3}, kinds=["kernels", "gradcam", "histograms"])
    recorder = StepRecorder()
    trainer = _fit([vis, recorder], TensorBoardLogger(tmp_path, name="tb"), tmp_path)

    run = trainer.logger.log_dir
    files = sorted(p.name for p in (tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert len(files) == 1, f"one event stream shared with the trainer's metrics, got {files}"
    acc = read_events(run)
    assert "train_loss" in acc.Tags()["scalars"]  # Lightning's own metrics, in the same stream
    assert recorder.steps == list(range(1, STEPS + 1))  # what the trainer reported after each batch
    # Step 0 is the model before training (on_train_start); then the trainer's global steps on the schedule.
    assert _image_steps(acc, "cnnvis/kernels/net.stem.0/grid") == [0, 2, 4, 6]
    assert _image_steps(acc, "cnnvis/gradcam/net.body/probe_001") == [0, 3, 6]  # names inside the LightningModule
    assert [e.step for e in acc.Histograms("cnnvis/histograms/net.stem.0/weight")] == [0, 2, 4, 6]
    assert acc.Tags()["tensors"], "the layer table (text) is missing"
    assert recorder.writer_open_at_fit_end is True  # the callback does not close the logger's writer
    assert vis.vis is None  # its own VisLogger is closed


@pytest.mark.parametrize("logger", ["none", "csv"])
def test_without_a_tensorboard_logger_writes_its_own_events_in_trainer_log_dir(tmp_path, logger):
    trainer_logger = False if logger == "none" else CSVLogger(tmp_path, name="csv")
    trainer = _fit([_callback(every=3)], trainer_logger, tmp_path)
    run = tmp_path if logger == "none" else tmp_path / "csv" / "version_0"
    assert trainer.log_dir == str(run)
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    if logger == "csv":
        assert (run / "metrics.csv").exists()  # the metrics' run folder
    assert _image_steps(read_events(run), "cnnvis/kernels/net.stem.0/grid") == [0, 3, 6]


def test_a_given_log_dir_wins_over_the_trainers_logger(tmp_path):
    _fit([_callback(every=3, log_dir=tmp_path / "vis")], TensorBoardLogger(tmp_path, name="tb"), tmp_path)
    assert _image_steps(read_events(tmp_path / "vis"), "cnnvis/kernels/net.stem.0/grid") == [0, 3, 6]
    assert read_events(tmp_path / "tb" / "version_0").Tags()["images"] == []


def test_training_is_identical_with_and_without_the_callback(tmp_path):
    def train(callbacks):
        L.seed_everything(7, verbose=False)
        model = LitTiny()
        _fit(callbacks, False, tmp_path, model=model)
        return model.state_dict()

    plain = train([])
    logged = train([_callback(every=2, kinds=["kernels", "gradcam", "saliency", "actmax", "histograms"],
                              actmax_steps=2, actmax_channels=1, log_dir=tmp_path / "vis")])
    assert read_events(tmp_path / "vis").Tags()["images"]
    for name in plain:
        assert torch.equal(plain[name], logged[name]), f"{name} differs"
    L.seed_everything(7, verbose=False)
    assert not torch.equal(plain["net.stem.0.weight"], LitTiny().state_dict()["net.stem.0.weight"])  # it trained


def test_a_second_fit_logs_again_through_the_reopened_writer(tmp_path):
    """The TensorBoard logger closes its writer at the end of a fit; a second fit still logs its visuals."""
    vis = _callback(every=3)
    trainer = _fit([vis], TensorBoardLogger(tmp_path, name="tb"), tmp_path)
    trainer.fit_loop.epoch_loop.max_steps = STEPS * 2
    trainer.fit(trainer.lightning_module, _loader())
    assert _image_steps(read_events(trainer.logger.log_dir), "cnnvis/kernels/net.stem.0/grid") == [0, 3, 6, 9, 12]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ddp_fork needs fork()")
def test_only_global_rank_zero_writes_under_ddp(tmp_path):
    _fit([_callback(every=1, kinds=["kernels", "gradcam"])], TensorBoardLogger(tmp_path, name="tb"), tmp_path,
         devices=2, strategy="ddp_fork")
    files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = read_events(files[0].parent)
    # Two ranks × STEPS batches of 4 out of 32 samples: STEPS global steps, each logged once.
    assert _image_steps(acc, "cnnvis/gradcam/net.body/probe_000") == list(range(STEPS + 1))


def test_a_layer_that_does_not_exist_fails_when_fitting_starts(tmp_path):
    model = LitTiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown layer 'net.bodyy'.*did you mean 'net.body'"):
        _fit([_callback(layers=["net.bodyy"])], False, tmp_path, model=model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # before any training step


def test_a_module_without_forward_gets_a_clear_message(tmp_path):
    class NoForward(LitTiny):
        forward = L.LightningModule.forward

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    with pytest.raises(ValueError, match="NoForward has no forward"):
        _fit([_callback()], False, tmp_path, model=NoForward())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"kinds": ["gradcm"]}, ValueError, "unknown kind 'gradcm'.*did you mean 'gradcam'"),
        ({"every": 0}, ValueError, "must be >= 1"),
        ({"every": {"histogram": 5}}, ValueError, "did you mean 'histograms'"),
        ({"probe_lables": [0, 1]}, TypeError, "unexpected keyword argument 'probe_lables'.*'probe_labels'"),
        ({"model": TinyCNN()}, TypeError, "chooses 'model' itself"),
        ({"writer": object()}, TypeError, "chooses 'writer' itself"),
        ({"probe": torch.zeros(3, 16, 16)}, ValueError, r"probe must be \[N, C, H, W\]"),
        ({"probe_labels": [0, 1, 2]}, ValueError, "one class per probe image: expected 2, got 3"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean must have one value per input channel: expected 3, got 2"),
        ({"std": (0.2, 0.0, 0.2)}, ValueError, "std values must be > 0"),
        ({"top_k": 0}, ValueError, "top_k must be a positive int"),
        ({"class_names": "abcd"}, TypeError, "class_names must be a sequence"),
        ({"log_dir": 3}, TypeError, "log_dir must be a folder path"),
        ({"saliency_methods": ["guided", "smoth"]}, ValueError, "unknown saliency method 'smoth'.*'smoothgrad'"),
    ],
)
def test_arguments_are_checked_before_training(options, error, match):
    probe, labels = make_batch(99, n=2)
    arguments = {"probe": probe, "probe_labels": labels, **options}
    with pytest.raises(error, match=match):
        CnnVisCallback(**arguments)


def test_importing_the_package_needs_no_lightning():
    code = (
        "import sys\n"
        "import cnnvis_tb, cnnvis_tb.integrations\n"
        "assert 'lightning' not in sys.modules and 'torch' not in sys.modules\n"
        "sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None  # as if not installed\n"
        "from cnnvis_tb.integrations import CnnVisCallback\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ImportError: cnnvis_tb.integrations.lightning needs PyTorch Lightning: pip install" in result.stderr


def test_the_package_level_name_is_the_callback():
    import cnnvis_tb.integrations

    assert cnnvis_tb.integrations.CnnVisCallback is CnnVisCallback
