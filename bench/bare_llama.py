"""A process that only loads the Llama model and generates once: the model's own memory.

``python -m nova_swarm.bench.bare_llama MODEL THREADS TOKENS``; prints ``ready`` and then
sleeps until it is terminated. The node agent's memory overhead is its RSS minus this one's,
measured side by side with the same model, context, threads and one generation of the same
length as the node's start-up profile (so both have their compute buffers allocated).
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str] | None = None) -> int:
    model, threads, tokens = (argv or sys.argv[1:])[:3]
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=2048, n_threads=int(threads), n_threads_batch=int(threads), verbose=False)
    llm.create_chat_completion(
        messages=[{"role": "user", "content": "Count from one to twenty."}],
        max_tokens=int(tokens),
        temperature=0.0,
        seed=0,
    )
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
