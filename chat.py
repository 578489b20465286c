"""Talk to an Apertus model in the terminal: a Hugging Face directory (a released Apertus-Instruct, or what
`train.export_hf` wrote) with its tokenizer.json, in the Apertus chat template, the answer streamed token by
token until <|assistant_end|>.

    python chat.py runs/apertus-8b-qrpo/hf                                  # a conversation; Ctrl-D ends it
    python chat.py Apertus-8B-Instruct-2509 --prompt "What is the Matterhorn?"   # one question, one answer
    python chat.py DIR --temperature 0 --max-new-tokens 200 --system "Answer in French."

Each turn renders the whole conversation with prepare.chat_tokens (ending with <|assistant_start|>) and feeds
the model only what its KV cache does not hold yet (model.forward's cache): the earlier turns are not
recomputed. One process, eager, SDPA; bfloat16 on CUDA, float32 on CPU. "/new" starts a new conversation.
"""
import argparse
import datetime
import sys

import torch

import checkpoint
import prepare
from data import DataError
from model import next_token

class Conversation:
    """The messages so far, the ids the model has seen and its KV cache."""

    def __init__(self, model, tok, system=None, date=prepare.CHAT_DATE):
        self.model, self.tok, self.system, self.date = model, tok, system, date
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.forget()

    def forget(self):
        """Drop the KV cache: the next turn feeds the whole conversation again."""
        self.ids, self.cache = [], {"length": 0}

    @torch.no_grad()
    def reply(self, text, max_new_tokens, temperature, top_k):
        """Yield the answer to `text` as pieces of text, as they come; the answer joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        ids, _ = prepare.chat_tokens(self.tok, self.messages, self.date, generation_prompt=True)
        if ids[:len(self.ids)] != self.ids:  # the answer re-encoded differently: start the cache over
            self.forget()
        end, limit = self.tok.special["<|assistant_end|>"], self.model.config.max_position_embeddings
        new, answer, shown = ids[len(self.ids):], [], ""  # new: what the cache lacks
        for _ in range(max_new_tokens):
            if len(self.ids) + len(new) > limit:
                break
            x = torch.tensor([new], device=self.model.lm_head.weight.device)
            logits = self.model(x, cache=self.cache)[:, -1].float()  # the next token's, after all of self.ids
            self.ids = self.ids + new
            nxt = int(next_token(logits, temperature, top_k))
            if nxt == end:  # not fed yet: the next turn's ids start with it
                break
            answer.append(nxt)
            text = self.tok.decode(answer)
            if not text.endswith("\ufffd"):  # a character cut between tokens waits for its last byte
                yield text[len(shown):]
                shown = text
            new = [nxt]
        text = self.tok.decode(answer)
        if text != shown:
            yield text[len(shown):]
        self.messages.append({"role": "assistant", "content": text})

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="chat.py", description="Chat with an Apertus model (Hugging Face directory).")
    parser.add_argument("model", help="a Hugging Face Apertus directory: config.json, safetensors, tokenizer.json")
    parser.add_argument("--prompt", help="one question: print the answer and exit")
    parser.add_argument("--system", help="the system message (default: Apertus' own, with --date)")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="the default system message's "
                        "current date, YYYY-MM-DD (default: today, as the Instruct models' template)")
    parser.add_argument("--tokenizer", help="the tokenizer (default: the model directory's tokenizer.json)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50, help="0: the whole vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tok = prepare.get_tokenizer(args.tokenizer or args.model)
        prepare.check_chat_tokenizer(tok)
        model = checkpoint.load_hf(args.model, device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    except (DataError, checkpoint.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    chat = Conversation(model, tok, args.system, args.date)
    ask = (lambda: args.prompt) if args.prompt is not None else (lambda: input("> "))
    while True:
        try:
            text = ask()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.strip() == "/new":
            chat.reset()
            continue
        if not text.strip():
            continue
        try:
            for piece in chat.reply(text, args.max_new_tokens, args.temperature, args.top_k):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation: its question is taken back,
            if chat.messages[-1]["role"] == "user":  # and the cache (perhaps half-written) starts over
                chat.messages.pop()
            chat.forget()
        print()
        if args.prompt is not None:
            return 0

if __name__ == "__main__":
    sys.exit(main())
