"""The ``edgebox`` command line (typer).

Errors a user can act on (``EdgeboxError``) print as one line on stderr with exit code 2; usage
errors keep click's exit code 2 as well; nothing prints a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer

from .errors import EdgeboxError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="edgebox: run DeepSeek-class GGUF models on power-capped edge boxes.")

ModelArg = typer.Argument(None, help="GGUF model file (default: the bundled tiny model)", show_default=False)


def _load(model: Optional[Path], chips: int = 1, n_ctx: Optional[int] = None, profile: Optional[str] = None):
    import edgebox

    return edgebox.load(model, chips=chips, n_ctx=n_ctx, profile=profile)


@app.command()
def run(
    model: Optional[Path] = ModelArg,
    prompt: str = typer.Option("", "-p", "--prompt", help="the prompt (or the user message with --chat)"),
    n_predict: int = typer.Option(128, "-n", "--n-predict", min=1, help="tokens to generate at most"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    top_k: int = typer.Option(40, "--top-k", help="keep the k most likely tokens (0 = off)"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling threshold (1 = off)"),
    min_p: float = typer.Option(0.05, "--min-p", help="drop tokens below min_p x the top probability (0 = off)"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="penalty for recently seen tokens (1 = off)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="RNG seed: the same seed gives the same text"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt with the GGUF's chat template (llama.cpp --jinja)"),
    system: Optional[str] = typer.Option(None, "--system", help="system message in --chat mode"),
    chips: int = typer.Option(1, "--chips", min=1, help="chips to split the model over"),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=1, help="context size (default: min(4096, the model's))"),
) -> None:
    """Generate text from a prompt, streamed to stdout; a timing line goes to stderr."""
    from .sampler import SamplingParams

    m = _load(model, chips, ctx)
    text = prompt
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = m.render_chat(messages)
    try:
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, seed=seed)
    except ValueError as e:
        raise EdgeboxError(str(e)) from None
    ids = m.tokenize_prompt(text)
    gen = m.stream(ids, max_tokens=n_predict, params=params, stop=stop)
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = gen.stats
    print(f"prompt: {s.prompt_tokens} tokens, {s.prompt_tok_per_s:.1f} tok/s | "
          f"decode: {s.generated_tokens} tokens, {s.decode_tok_per_s:.1f} tok/s | stop: {s.done_reason}",
          file=sys.stderr)


@app.command()
def info(model: Optional[Path] = ModelArg) -> None:
    """Architecture, size, tensor types, context, tokenizer and chat template of a model."""
    from .model_info import describe

    for key, value in describe(_load(model)):
        typer.echo(f"{key:<16} {value}")


@app.command()
def plan(
    model: Optional[Path] = ModelArg,
    chips: int = typer.Option(4, "--chips", min=1, help="chips in the box"),
    profile: Optional[str] = typer.Option(None, "--profile", help="chip profile name or TOML path (default r100-edge; host for 1 chip)"),
    budget: float = typer.Option(10.0, "--budget", help="power budget in watts"),
    context: int = typer.Option(512, "--context", min=1, help="tokens of context per sequence"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Capacity planning: per-chip memory, predicted tok/s and watts at every DVFS level and batch."""
    import json

    from .chips.plan import format_plan, make_plan

    m = _load(model, chips, profile=profile)
    p = make_plan(m, budget, context=context)
    typer.echo(json.dumps(p.to_dict(), indent=1) if json_out else format_plan(p))


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except EdgeboxError as e:
        print(f"edgebox: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
