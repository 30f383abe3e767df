"""The one training loop of specdec's trainers: the LM pair (`lm`), the dLLM fine-tune (`dllm`) and the
drafter heads (`head_train`).

What every run shares lives here: AdamW (weight decay on matrices only, betas 0.9/0.95), a linear warm-up
then a cosine decay to a floor, gradient-norm clipping, a progress bar with the loss and tokens/s, a
JSON-lines log (the loss curve, and the budget changes a model card reports) and an atomic checkpoint that
re-running the same command resumes from. A trainer brings only what one optimizer step computes (a
`StepFn`); what data step i sees must be a pure function of (seed, i), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


class OptimizerSettings(Protocol):
    """The fields of a trainer's config that the loop reads (every train config has them)."""

    @property
    def lr(self) -> float: ...  # peak learning rate, reached at the end of the warm-up
    @property
    def min_lr_ratio(self) -> float: ...  # the cosine decays to lr * min_lr_ratio
    @property
    def warmup_fraction(self) -> float: ...  # of all steps
    @property
    def weight_decay(self) -> float: ...
    @property
    def grad_clip(self) -> float: ...  # max global gradient norm
    @property
    def checkpoint_minutes(self) -> float: ...  # between checkpoints (one is always written on the way out)


def adamw(model: torch.nn.Module, cfg: OptimizerSettings, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW decaying only matrices (norm gains and biases are not pulled towards zero). `fused` is passed to
    torch as is: None lets torch choose, which is not the same as False on every device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
        fused=fused,
    )


def cosine_lr(cfg: OptimizerSettings, step: int, total_steps: int) -> float:
    """The learning rate of step `step` of `total_steps`: linear warm-up, then cosine down to the floor."""
    warmup = max(1, int(total_steps * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------------------
# Run files: checkpoint and log
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """Where a run named `name` keeps its state inside its working directory."""

    workdir: Path
    name: str  # "target", "draft", "dllm", or a head kind ("eagle", ...): several runs share a workdir

    @property
    def ckpt(self) -> Path:
        return self.workdir / f"{self.name}.ckpt"

    @property
    def log(self) -> Path:  # JSON lines: the loss curve and any budget change
        return self.workdir / f"{self.name}.log.jsonl"


def append_log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def budget_changes(log_path: Path) -> list[dict]:
    """The budget changes (`resume_config(..., new_budget=...)`) recorded in a training log, oldest first."""
    return [r for r in read_log(log_path) if "budget_changed" in r]


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    return torch.load(path, weights_only=False) if path.exists() else None


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Written beside the checkpoint and renamed over it: an interruption never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


# A train config: resume_config rebuilds one from its checkpoint's record and `replace`s fields.
C = TypeVar("C", bound="DataclassInstance")


@dataclass(frozen=True)
class ResumeRule:
    """How a resumed run's config is made from the one its checkpoint recorded (its schedule: token budget,
    lr, windows) and the one given now."""

    saved_key: str  # the recorded config's key in the checkpoint
    runtime: tuple[str, ...]  # fields about how the run runs, not what it trains: taken from the given config
    budget: str  # the token-budget field; a `new_budget` moves the end of the recorded schedule


def resume_config(
    state: dict[str, Any] | None, given: C, rule: ResumeRule, new_budget: int | None, log_path: Path
) -> C:
    """The config a run goes on with: `given` for a new run; for a resumed one the recorded config with
    `rule.runtime` from `given` and `new_budget` as its budget. A budget change recomputes the cosine from the
    current step, and is logged so the model card can say the run was not one uninterrupted schedule."""
    if state is None:
        return given
    runtime = {f: getattr(given, f) for f in rule.runtime}
    cfg = replace(type(given)(**state[rule.saved_key]), **runtime)
    if new_budget is not None and new_budget != getattr(cfg, rule.budget):
        change = {"from": getattr(cfg, rule.budget), "to": new_budget}
        append_log(log_path, {"step": state["step"], "budget_changed": change})
        cfg = replace(cfg, **{rule.budget: new_budget})
    return cfg


def open_run(
    files: RunFiles, given: C, rule: ResumeRule, new_budget: int | None
) -> tuple[dict[str, Any] | None, C]:
    """(the run's checkpoint or None, the config it goes on with: `resume_config`)."""
    state = read_checkpoint(files.ckpt)
    return state, resume_config(state, given, rule, new_budget, files.log)


@dataclass
class Progress:
    """A run's counters, saved in its checkpoint."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds spent in training steps, over every session of the run


def restore(
    state: dict[str, Any] | None, model_key: str, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> Progress:
    """Weights, optimizer moments and counters from a checkpoint (fresh counters when there is none)."""
    if state is None:
        return Progress()
    model.load_state_dict(state[model_key])
    opt.load_state_dict(state["optimizer"])
    return Progress(state["step"], state["tokens_seen"], state["elapsed"])


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """What one step's forward computed: the loss to minimise and what to report about it."""

    loss: torch.Tensor
    tokens: int  # tokens trained on (tokens_seen, tokens/s)
    record: dict[str, Any] = field(default_factory=dict)  # extra fields of the step's log record
    postfix: dict[str, Any] = field(default_factory=dict)  # extra fields of the progress bar


StepFn = Callable[[int], StepOutput]  # optimizer step index -> its forward (the loop runs backward and steps)


@dataclass(frozen=True)
class LoopPlan:
    files: RunFiles
    total_steps: int
    settings: OptimizerSettings  # schedule, clipping, checkpoint interval
    desc: str  # progress-bar label
    log_every: int  # steps between loss-curve records (the last step is always logged)
    saved: dict[str, Any]  # what the checkpoint holds besides weights, optimizer and counters (the config...)
    model_key: str = "model"  # the weights' key in the checkpoint ("head" in head checkpoints)
    stop_after: int | None = None  # end this call after that many steps (an interruption, for tests)
    # end this call once it ran this many wall seconds (a lent machine's budget), checkpointed like any end
    stop_at_seconds: float | None = None


def run_loop(
    model: torch.nn.Module, opt: torch.optim.Optimizer, step_fn: StepFn, plan: LoopPlan, progress: Progress
) -> None:
    """Step until `plan.total_steps` (or `stop_after` steps in this call), resuming at `progress.step`.

    A checkpoint is written every `checkpoint_minutes` and on the way out, however the loop ends (finished,
    Ctrl-C, `kill`), when this call trained at all.
    """
    model.train()
    bar = tqdm(total=plan.total_steps, initial=progress.step, desc=plan.desc, unit="step")
    last_save, done_here = time.monotonic(), 0
    began = last_save
    restore_signal = stop_on_sigterm()

    def more() -> bool:
        if progress.step >= plan.total_steps or (
            plan.stop_after is not None and done_here >= plan.stop_after
        ):
            return False
        return plan.stop_at_seconds is None or time.monotonic() - began < plan.stop_at_seconds

    try:
        while more():
            t0 = time.monotonic()
            lr = cosine_lr(plan.settings, progress.step, plan.total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            out = step_fn(progress.step)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), plan.settings.grad_clip)
            opt.step()
            done_here += 1
            dt = time.monotonic() - t0
            progress.step += 1
            progress.tokens_seen += out.tokens
            progress.elapsed += dt
            _report(bar, plan, progress, out, loss=out.loss.item(), lr=lr, dt=dt)
            if time.monotonic() - last_save > plan.settings.checkpoint_minutes * 60:
                _save(model, opt, plan, progress)
                last_save = time.monotonic()
    finally:
        restore_signal()
        if done_here:
            _save(model, opt, plan, progress)
        bar.close()


def train_run(
    model: torch.nn.Module,
    step_fn: StepFn,
    plan: LoopPlan,
    state: dict[str, Any] | None,
    fused: bool | None = None,
) -> None:
    """AdamW over `model`, restored with the counters from `state` (the run's checkpoint) when resuming, then
    `run_loop`."""
    opt = adamw(model, plan.settings, fused)
    run_loop(model, opt, step_fn, plan, restore(state, plan.model_key, model, opt))


def _report(
    bar, plan: LoopPlan, progress: Progress, out: StepOutput, loss: float, lr: float, dt: float
) -> None:
    bar.update(1)
    bar.set_postfix(
        loss=f"{loss:.3f}",
        tok_s=f"{out.tokens / dt:.0f}",
        seen=f"{progress.tokens_seen / 1e6:.1f}M",
        **out.postfix,
    )
    if progress.step % plan.log_every == 0 or progress.step == plan.total_steps:
        counters = {"tokens_seen": progress.tokens_seen, "elapsed": progress.elapsed, "lr": lr}
        append_log(plan.files.log, {"step": progress.step, "loss": loss, **out.record, **counters})


def _save(model: torch.nn.Module, opt: torch.optim.Optimizer, plan: LoopPlan, progress: Progress) -> None:
    payload = {
        plan.model_key: model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": progress.step,
        "tokens_seen": progress.tokens_seen,
        "elapsed": progress.elapsed,
        **plan.saved,
    }
    write_checkpoint(plan.files.ckpt, payload)


def stop_on_sigterm() -> Callable[[], object]:
    """`kill PID` of a background run ends it like Ctrl-C (a background job ignores SIGINT), so the checkpoint
    is saved on the way out. Returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_metrics(state: dict[str, Any], model: torch.nn.Module, files: RunFiles, config_key: str) -> dict:
    """The training_metrics.json fields every exported model reports about its run."""
    return {
        "tokens_seen": state["tokens_seen"],
        "train_seconds": state["elapsed"],
        "steps": state["step"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_config": state[config_key],
        "budget_changes": budget_changes(files.log),
    }


# ----------------------------------------------------------------------------------------------------------
# Loss curve
# ----------------------------------------------------------------------------------------------------------


def plot_loss(log_path: Path, out: Path, title: str, curve: str, ylabel: str) -> bool:
    """loss.png from a run's log: one line per entry of the records' `step_losses` (`curve` k), else the loss.
    False where matplotlib is missing or nothing was logged."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in read_log(log_path) if "loss" in r]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    tokens = [r["tokens_seen"] / 1e6 for r in rows]
    if "step_losses" in rows[0]:
        for k in range(len(rows[0]["step_losses"])):
            ax.plot(tokens, [r["step_losses"][k] for r in rows], lw=1, label=f"{curve} {k}")
    else:
        ax.plot(tokens, [r["loss"] for r in rows], lw=1, label=curve)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True
