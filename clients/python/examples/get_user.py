"""Read key "1" of namespace "users" from a local cachecoord and print its JSON.

Run: python clients/python/examples/get_user.py   (with a server on 127.0.0.1:50051)
"""

from __future__ import annotations

import asyncio
import json
import sys

from cachecoord_client import AsyncClient, CacheCoordError


async def main() -> int:
    # AsyncClient must be created inside the running loop, hence inside main().
    async with AsyncClient("127.0.0.1:50051") as client:
        try:
            user = await client.get("users", "1")
        except CacheCoordError as err:
            print(f"cachecoord: {err}", file=sys.stderr)
            return 1
    if not user.found:
        print('no key "1" in namespace "users"', file=sys.stderr)
        return 1
    # Mapped namespaces hold a JSON object with the row's columns.
    print(json.dumps(json.loads(user.value), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
