"""A tiny long-running filterd node for tests: builds one Pipeline from ``--set`` overrides and
scans one transaction per JSON line on stdin, answering one JSON line on stdout. Two of these
sharing a Redis are two gateway nodes; keeping the process alive across a Redis outage shows
the degrade and the automatic recovery of one running node.

Request: {"ip": "...", "from": "...", "rcpt": [...], "auth": "", "msg": "<text>"}
Reply:   {"action": ..., "recipients": {addr: {"action", "code", "reason"}},
          "symbols": [names], "degraded": null|"fallback"|"skip"}
"""
from __future__ import annotations

import asyncio
import json
import sys


async def main(overrides: list[str]) -> None:
    from filterd.model import Session
    from filterd.pipeline import Pipeline

    pipe = await Pipeline.create(None, overrides, use_default_path=False)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            req = json.loads(line)
            session = Session(peer_ip=req.get("ip", "192.0.2.1"), auth_user=req.get("auth", ""),
                              front_door="smtp")
            res = await pipe.scan(req["msg"].encode(), req.get("from", ""), req.get("rcpt", []),
                                  session)
            rcpts = {a: {"action": o.action.value, "code": o.verdict.code,
                         "reason": o.verdict.reason} for a, o in res.outcomes.items()}
            syms = sorted({s.name for s in res.ctx.all_symbols()}
                          | {s.name for ss in res.ctx.rcpt_symbols.values() for s in ss})
            store = pipe.services._store
            print(json.dumps({"action": res.action.value, "recipients": rcpts, "symbols": syms,
                              "degraded": getattr(store, "degraded", None)}), flush=True)
    finally:
        await pipe.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
