"""The Node.js client as a user installs it (clients/node/README.md): `npm pack`
of clients/node (its prepack script compiles dist/), then `npm install` of the
tarball into a fresh application that brings its own, older, @grpc/grpc-js;
the application, in TypeScript, is compiled against the package's declarations
and run against the session server: Get, Put, a lock, a Watch event.

The client must use the application's @grpc/grpc-js (a peer dependency): with
a copy of its own, the credentials the application makes are not the
`ChannelCredentials` of the client's copy and the first call throws. The
packages come from the npm registry (npm's own cache keeps them after the
first run); clients/node's build tools come from `make node-client`."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path

import pytest

from cachecoord.app import App
from cachecoord_client import AsyncClient

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
# The oldest minor of the peer dependency's range (clients/node/package.json).
OLD_GRPC_JS = "1.10.12"
STEP_S = 180  # bound on each npm or node step (an install may download)

APP_PACKAGE = {
    "name": "cachecoord-install-check",
    "version": "0.0.0",
    "private": True,
    "dependencies": {"@grpc/grpc-js": OLD_GRPC_JS},
    "devDependencies": {"@types/node": "20.19.43", "typescript": "5.9.3"},
}
APP_TSCONFIG = {
    "compilerOptions": {
        "target": "ES2022",
        "module": "commonjs",
        "moduleResolution": "node10",
        "lib": ["ES2022"],
        "types": ["node"],
        "strict": True,
        "outDir": "dist",
    },
    "files": ["main.ts"],
}
APP_MAIN = r"""
import { credentials, Metadata } from "@grpc/grpc-js";
import {
  AcquireLockRequest,
  CacheCoordServiceClient,
  GetRequest,
  PutRequest,
  traceparent,
  WatchRequest,
  unary,
  type WatchResponse,
} from "@cachecoord/client";

const [target, prefix] = process.argv.slice(2);
const client = new CacheCoordServiceClient(target, credentials.createInsecure());
const md = () => {
  const m = new Metadata();
  m.set("traceparent", traceparent());
  return m;
};
const deadline = () => ({ deadline: new Date(Date.now() + 5_000) });
const fail = (why: string): never => {
  throw new Error(why);
};

async function main(): Promise<void> {
  const users1 = GetRequest.fromPartial({ namespace: "users", key: "1" });
  const user = await unary(client.get.bind(client), users1, md(), deadline());
  const name = JSON.parse(Buffer.from(user.value).toString()).name;
  if (!user.found || name !== "Ada Lovelace") fail(`users/1: ${JSON.stringify(user)}`);
  console.log(`ok get: users/1 ${name}`);

  // Watch: the first event is a RESET; then the Put's invalidation must come.
  const key = `${prefix}a`;
  const request = WatchRequest.fromPartial({ namespaces: ["blobs"], keyPrefix: prefix });
  const watch = client.watch(request, md());
  watch.on("error", () => undefined); // the cancel below ends it with CANCELLED
  const events: WatchResponse[] = [];
  let wake = () => {};
  watch.on("data", (event: WatchResponse) => {
    events.push(event);
    wake();
  });
  const next = async (): Promise<WatchResponse> => {
    const until = Date.now() + 5_000;
    while (events.length === 0) {
      if (Date.now() > until) fail("no Watch event within 5 s");
      await new Promise<void>((resolve) => {
        wake = resolve;
        setTimeout(resolve, 100);
      });
    }
    return events.shift()!;
  };
  const first = await next();
  if (first.event?.$case !== "reset") fail(`first Watch event: ${JSON.stringify(first)}`);
  console.log("ok watch_reset");

  const put = await unary(
    client.put.bind(client),
    PutRequest.fromPartial({
      namespace: "blobs",
      key,
      value: Buffer.from("from an app"),
      expectedVersion: 0n,
    }),
    md(),
    deadline(),
  );
  const read = await unary(
    client.get.bind(client),
    GetRequest.fromPartial({ namespace: "blobs", key }),
    md(),
    deadline(),
  );
  if (Buffer.from(read.value).toString() !== "from an app" || read.version !== put.version) {
    fail(`blobs/${key}: ${JSON.stringify({ found: read.found, version: String(read.version) })}`);
  }
  console.log(`ok put: blobs/${key} version ${put.version}`);

  for (;;) {
    const event = await next();
    if (event.event?.$case === "invalidation" && event.event.value.key === key) break;
  }
  console.log(`ok watch_event: invalidation of blobs/${key}`);
  watch.cancel();

  const lock = await unary(
    client.acquireLock.bind(client),
    // fromPartial (as the client's README says): fields added to the contract
    // later take their defaults instead of breaking this code's compilation.
    AcquireLockRequest.fromPartial({ name: `${prefix}lock`, ttlMs: 5_000n, waitTimeoutMs: 0n }),
    md(),
    deadline(),
  );
  if (!lock.token || lock.fencingToken <= 0n) fail(`lock: ${lock.token} ${lock.fencingToken}`);
  const release = { name: `${prefix}lock`, token: lock.token };
  await unary(client.releaseLock.bind(client), release, md(), deadline());
  console.log(`ok lock: acquired (fencing token ${lock.fencingToken}) and released`);
  console.log(`RESULT ${JSON.stringify({ key, version: String(put.version) })}`);
}

main()
  .then(() => client.close())
  .catch((err) => {
    console.log(`FAIL ${err instanceof Error ? err.stack : String(err)}`);
    process.exit(1);
  });
"""


async def _run(*argv: str | Path, cwd: Path) -> str:
    env = {
        **os.environ,
        "npm_config_audit": "false",
        "npm_config_fund": "false",
        "npm_config_update_notifier": "false",
    }
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), STEP_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    output = raw.decode()
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{output}"
    return output


def _tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node, "node is not installed (apt-get install nodejs npm)"
    assert npm, "npm is not installed (apt-get install nodejs npm)"
    assert (NODE_DIR / "node_modules" / ".bin" / "tsc").exists(), "run `make node-client`"
    return node, npm


@pytest.mark.timeout(5 * STEP_S)
async def test_packed_node_client_runs_in_an_app_with_older_grpc_js(
    app: App, client: AsyncClient, tmp_path: Path
) -> None:
    node, npm = _tools()
    packs = tmp_path / "packs"
    packs.mkdir()
    await _run(npm, "pack", "--pack-destination", packs, cwd=NODE_DIR)
    (tarball,) = packs.glob("*.tgz")
    with tarfile.open(tarball) as tar:
        shipped = set(tar.getnames())
    assert {"package/dist/src/index.js", "package/dist/src/index.d.ts"} <= shipped, shipped

    project = tmp_path / "app"
    project.mkdir()
    (project / "package.json").write_text(json.dumps(APP_PACKAGE, indent=2))
    (project / "tsconfig.json").write_text(json.dumps(APP_TSCONFIG, indent=2))
    (project / "main.ts").write_text(APP_MAIN)
    await _run(npm, "install", cwd=project)
    await _run(npm, "install", tarball, cwd=project)  # as clients/node/README.md says

    # One @grpc/grpc-js in the app, the app's own (older) one.
    modules = project / "node_modules"
    grpc_js = json.loads((modules / "@grpc" / "grpc-js" / "package.json").read_text())
    assert grpc_js["version"] == OLD_GRPC_JS
    assert not (modules / "@cachecoord" / "client" / "node_modules" / "@grpc").exists()

    await _run(modules / ".bin" / "tsc", "-p", ".", cwd=project)
    prefix = f"node-app-{uuid.uuid4().hex[:12]}-"
    output = await _run(node, "dist/main.js", f"127.0.0.1:{app.port}", prefix, cwd=project)
    print(output)  # the program's checks, shown with -s or on failure
    lines = output.splitlines()
    for check in ("get", "watch_reset", "put", "watch_event", "lock"):
        assert any(line.startswith(f"ok {check}") for line in lines), f"no {check}: {output}"
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    got = await client.get("blobs", result["key"])
    assert got.found
    assert got.value == b"from an app"
    assert got.version == int(result["version"])
