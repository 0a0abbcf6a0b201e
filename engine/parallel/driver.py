"""Rank 0 drives, the other ranks follow: one `Generator` per rank over its part of the model, the same run on all.

Rank 0's `generate(prompts, settings)` puts the command (token ids, settings) in the store; every follower takes it
there and runs the same call. The runs then meet only in the model's collectives (all-reduces, the logits' gather),
and twice more per run:

    the gate      once every rank has allocated its run (KV cache, offload store), right before prefill: all agree to
                  start. A rank that refused the run (too long a prompt, no memory for its K/V) says no there, so
                  the others leave the run too and nobody waits inside a collective; the engine stays usable and
                  rank 0 raises the refusing rank's own error.
    the outcome   after the run: every rank's outcome, gathered. A rank that died after its last collective is
                  caught here rather than at the next command.

A failure past the gate is fatal to the engine: the failing rank leaves its report in the store and leaves the
group, which turns its peers' pending collectives into errors (a dead peer, or one stuck past the group's timeout,
gives an error, not a hang); every rank releases its run's memory, and rank 0 raises TensorParallelError naming the
rank that failed and what it was doing. Sampling agrees across ranks because every rank samples from the same
gathered logits with the same seed (rank 0 draws one for unseeded sampling).
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, replace

import torch

from engine import errors
from engine.errors import InvalidSettingsError, KVLabError, TensorParallelError
from engine.generator import GenerationResult, Generator
from engine.loader import LoadedModel
from engine.memory import release_run_memory
from engine.parallel.group import PeerLostError, TPGroup
from engine.settings import GenerationSettings

# How long an idle follower waits on the store in one go before asking again (no collective is open meanwhile).
IDLE_WAIT_S = 60.0
# How long rank 0 waits for the other ranks' failure reports once its own collective failed.
REPORT_WAIT_S = 10.0


class PeerRefusedError(RuntimeError):
    """Another rank refused the run at the gate; this rank leaves it too."""


@dataclass(frozen=True)
class Command:
    op: str  # "generate" or "stop"
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    settings: GenerationSettings | None = None


@dataclass(frozen=True)
class Outcome:
    """How one rank's run ended: "ok", "refused" (before the gate, with its error), "left" (another rank refused)."""

    rank: int
    kind: str
    error_type: str = ""
    message: str = ""
    facts: RankFacts | None = None  # for "ok"


@dataclass(frozen=True)
class RankFacts:
    """What one rank did in the last run, gathered on rank 0 with the outcomes (benches, per-rank views)."""

    rank: int
    device: str
    weight_bytes: int  # this rank's part of the model
    kv_bytes_per_token: int  # its K/V heads, all layers
    act_bytes_per_token: int  # the full hidden state, all layers
    peak_h2d_gb_s: float | None  # its measured link (None: no profile measured)
    step_ms: tuple[float, ...]  # its own decode steps' wall times
    h2d_bytes: tuple[int, ...]  # per decode step, what its plan copies host-to-device (empty: GPU-resident)
    d2h_bytes: tuple[int, ...]
    predicted_ms: tuple[float, ...]  # per decode step, what its scheduler predicted
    placement: str
    collective_calls: int  # all-reduces during the run
    collective_bytes: int  # payload of its all-reduces and all-gathers during the run


@dataclass(frozen=True)
class FailureReport:
    """What a rank leaves in the store when a run fails past the gate."""

    rank: int
    stage: str
    message: str
    peer_lost: bool  # it failed because another rank did (its collective broke), not on its own


class TensorParallelEngine:
    """This rank's share of a tensor-parallel engine. Rank 0 calls `generate`; the other ranks call `follow`."""

    def __init__(self, group: TPGroup, model: LoadedModel, *, profile=None, owns_group: bool = True):
        self.group, self.model = group, model
        self.owns_group = owns_group  # close() and the end of follow() leave the group too
        self._keys = f"engine{group.next_engine_id()}/"
        self.generator = Generator(model)
        self.generator.profile = profile  # this rank's own measured link (engine/parallel/launch.py)
        self.generator.before_prefill = self._gate
        self._commands = 0
        self._gate_state = "idle"  # "waiting" until the gate, then "passed" or "left"
        self.stopped_why: str | None = None
        self.last_result: GenerationResult | None = None  # this rank's result of the last run (followers too)
        self.rank_facts: list[RankFacts] = []  # every rank's facts of the last run that ran (on every rank)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    # -- rank 0 --------------------------------------------------------------------------------------------
    def generate(self, prompts, settings: GenerationSettings = GenerationSettings(), *,
                 keep_logits: bool = False) -> GenerationResult:
        """What `Generator.generate` returns, computed by every rank together (call on rank 0 only)."""
        if self.rank != 0:
            raise InvalidSettingsError(f"generate is rank 0's call; rank {self.rank} follows it: call follow() there.")
        self._check_running()
        if not isinstance(settings, GenerationSettings):
            raise InvalidSettingsError(f"settings must be a GenerationSettings instance, got {type(settings).__name__}: "
                                       "build one with GenerationSettings(max_new_tokens=...).")
        for name, why in (("fused", "the fast adapter runs the projections' GEMMs itself, past the row-parallel "
                                    "all-reduces"),
                          ("compile", "a compiled decode step over the ranks' collectives is not supported")):
            if getattr(settings, name) is True:
                raise InvalidSettingsError(f"{name}=True is not supported under tensor parallel ({why}): set "
                                           f"{name}=False.")
        if settings.fused == "auto":  # the plain adapter: its projections are the sharded modules
            settings = replace(settings, fused=False)
        prompt_ids = self.generator.encode(prompts)  # bad prompts are refused here, before any rank hears of them
        if not settings.sampling.greedy and settings.sampling.seed is None:  # one seed for every rank's sampler
            settings = replace(settings, sampling=replace(settings.sampling, seed=random.randrange(2**63)))
        command = Command(op="generate", prompt_ids=tuple(tuple(p) for p in prompt_ids), settings=settings)
        return self._send(command, keep_logits=keep_logits)

    def close(self) -> None:
        """Rank 0: tell the followers to stop, then leave the group. Any rank: leave the group."""
        if self.rank == 0 and self.stopped_why is None:
            try:
                self._send(Command(op="stop"))
            except (PeerLostError, KVLabError):
                pass
        self.stopped_why = self.stopped_why or "closed"
        if self.owns_group:
            self.group.close()

    def _send(self, command: Command, *, keep_logits: bool = False):
        self._commands += 1
        self.group.put(f"{self._keys}cmd/{self._commands}", command)
        if self._commands > 1:  # every follower passed the previous command's outcome exchange: it has read it
            self.group.drop(f"{self._keys}cmd/{self._commands - 1}")
        if command.op == "stop":
            return None
        return self._execute(command, keep_logits=keep_logits)

    # -- the other ranks -----------------------------------------------------------------------------------
    def follow(self) -> str:
        """Run rank 0's commands until it stops the engine or the engine fails -> why it ended. Returns instead of
        raising, so that under torchrun a follower ends cleanly and rank 0 keeps the floor to report."""
        if self.rank == 0:
            raise InvalidSettingsError("rank 0 drives the engine (generate, close); follow() is for the other ranks.")
        while self.stopped_why is None:
            try:
                command = self.group.take(f"{self._keys}cmd/{self._commands + 1}", timeout_s=IDLE_WAIT_S)
            except TimeoutError:
                continue
            except PeerLostError as exc:
                self._stop(f"rank {self.rank} lost rank 0: {exc}")
                break
            self._commands += 1
            if command.op == "stop":
                self._stop("stopped by rank 0")
                break
            try:
                self._execute(command, keep_logits=False)
            except TensorParallelError:
                break  # reported in the store; stopped_why says what happened (the group is closed)
        if self.owns_group:
            self.group.close()
        return self.stopped_why

    # -- every rank: one run -------------------------------------------------------------------------------
    def _execute(self, command: Command, *, keep_logits: bool):
        self._gate_state = "waiting"
        result, mine = None, None
        calls, payload = self.group.all_reduce_calls, self.group.all_reduce_bytes
        try:
            result = self.generator.generate([list(p) for p in command.prompt_ids], command.settings,
                                             keep_logits=keep_logits)
            outcome = Outcome(rank=self.rank, kind="ok", facts=self._facts(
                result, command.settings, calls=self.group.all_reduce_calls - calls,
                payload=self.group.all_reduce_bytes - payload))
            self.last_result = result
        except Exception as exc:  # noqa: BLE001 - every failure is classified below, none is dropped
            exc.__traceback__ = None  # its frames hold the run's tensors
            if self._gate_state == "waiting" and not self.group.peer_lost:  # refused before the gate
                mine = exc
                outcome = Outcome(rank=self.rank, kind="refused", error_type=type(exc).__name__, message=str(exc))
                try:
                    self.group.agree(False)  # the ranks waiting at the gate leave the run too
                except PeerLostError as lost:
                    self._fail(lost)
            elif self._gate_state == "left":
                outcome = Outcome(rank=self.rank, kind="left")
            else:
                self._fail(exc)
        finally:
            self._gate_state = "idle"
        try:
            outcomes = self.group.gather_objects(outcome)
        except PeerLostError as exc:
            self._fail(exc)
        if all(o.kind == "ok" for o in outcomes):
            self.rank_facts = [o.facts for o in outcomes]
        refused = [o for o in outcomes if o.kind == "refused"]
        if refused and self.rank == 0:
            first = refused[0]
            if first.rank == 0:
                raise mine
            kind = getattr(errors, first.error_type, None)
            kind = kind if isinstance(kind, type) and issubclass(kind, KVLabError) else TensorParallelError
            raise kind(f"rank {first.rank} refused the run: {first.message}")
        return result

    def _facts(self, result: GenerationResult, settings: GenerationSettings, *, calls: int, payload: int) -> RankFacts:
        spec, plan = self.model.spec, self.generator.plan if settings.offload.offloaded else None
        steps = plan.steps[: len(result.step_ms)] if plan is not None else ()
        profile = self.generator.profile
        return RankFacts(rank=self.rank, device=str(self.model.device), weight_bytes=spec.weight_bytes,
                         kv_bytes_per_token=spec.kv_bytes_per_token, act_bytes_per_token=spec.act_bytes_per_token,
                         peak_h2d_gb_s=None if profile is None else profile.peak_h2d_gb_s,
                         step_ms=tuple(result.step_ms), h2d_bytes=tuple(p.h2d_bytes for p in steps),
                         d2h_bytes=tuple(p.d2h_bytes for p in steps), predicted_ms=tuple(p.predicted_ms for p in steps),
                         placement=settings.offload.placement, collective_calls=calls, collective_bytes=payload)

    def _gate(self) -> None:
        """Generator.before_prefill: every rank has its run allocated; all start, or none."""
        if not self.group.agree(True):
            self._gate_state = "left"
            raise PeerRefusedError(f"rank {self.rank}: another rank refused the run")
        self._gate_state = "passed"

    def _fail(self, exc: BaseException):
        """A run failed past the gate: report, leave the group, free the run, raise TensorParallelError (rank 0
        names the rank that failed first on its own)."""
        # The generator wraps what failed in a RunFailedError about a single process: report what failed itself.
        message = self.generator.failure_detail if isinstance(exc, errors.RunFailedError) and \
            self.generator.failure_detail else _first_line(exc)
        report = FailureReport(rank=self.rank, stage=self.generator.stage, message=message,
                               peer_lost=self.group.peer_lost or isinstance(exc, PeerLostError))
        try:
            self.group.put(f"{self._keys}failure/{self.rank}", report)
        except (RuntimeError, PeerLostError):
            pass  # the store is gone with rank 0; there is no one left to tell
        self.group.close()
        _free_run_memory(self.model.device)
        reports = self._reports(report) if self.rank == 0 else [report]
        cause = next((r for r in reports if not r.peer_lost), None)
        if cause is None and self.rank != 0:
            what = f"rank {self.rank} lost its peers during {report.stage} ({report.message}); rank 0 names the cause"
        elif cause is None:
            lost = ", ".join(f"rank {r.rank} during {r.stage}" for r in reports)
            what = f"the ranks lost each other ({lost}; no rank reported a failure of its own: one stopped answering " \
                   f"within the {self.group.timeout_s:.0f} s timeout, or died without a word)"
        else:
            what = f"rank {cause.rank} failed during {cause.stage}: {cause.message}"
        self.stopped_why = (f"Tensor-parallel run over {self.world_size} ranks failed: {what}. The engine has stopped: "
                            "every rank left the process group and released its run's memory; launch it again "
                            "(torchrun).")
        raise TensorParallelError(self.stopped_why)

    def _reports(self, mine: FailureReport) -> list[FailureReport]:
        """Rank 0's and the others' failure reports: until one rank reports a failure of its own, or all reported."""
        reports = {0: mine}
        waited = 0.0
        step = 0.5
        while waited < REPORT_WAIT_S and len(reports) < self.world_size:
            if any(not r.peer_lost for r in reports.values()):
                break
            for rank in range(1, self.world_size):
                if rank not in reports:
                    try:
                        reports[rank] = self.group.take(f"{self._keys}failure/{rank}",
                                                        timeout_s=step / self.world_size)
                    except (TimeoutError, PeerLostError):
                        pass
            waited += step
        return sorted(reports.values(), key=lambda r: (r.peer_lost, r.rank))

    def _stop(self, why: str) -> None:
        self.stopped_why = why

    def _check_running(self) -> None:
        if self.stopped_why is not None:
            raise TensorParallelError(f"The tensor-parallel engine is not running ({self.stopped_why}).")


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:400] if text else ''}"


def _free_run_memory(device: torch.device) -> None:
    gc.collect()  # the failed run's frames may sit in reference cycles
    release_run_memory(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = ["Command", "FailureReport", "Outcome", "PeerRefusedError", "RankFacts", "TensorParallelEngine"]
