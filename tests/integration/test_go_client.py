"""The Go stubs (clients/go) compiled and run as clients/go/README.md installs
them without a module proxy: Debian's Go toolchain and Go source packages
(make debian-tools installs them), GOPATH mode, the module's folder copied to
its import path in a fresh GOPATH. The example (examples/getuser) and a small
application of its own (Get, Put, a Watch event, a lock) are built there and
run against the session server; what the application wrote is read back
through the Python client. The hold-lock example (examples/holdlock) then
holds a lock on a server that recycles its connections every half second,
while a Python client is refused it throughout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
from recycling_support import held_across_recycling

from cachecoord.app import App
from cachecoord_client import AsyncClient
from local_servers import PostgresServer

GO_DIR = Path(__file__).resolve().parents[2] / "clients" / "go"
MODULE = "github.com/cachecoord/cachecoord/clients/go"
DEBIAN_GOPATH = Path("/usr/share/gocode")  # Debian's golang-*-dev packages
BUILD_S = 300  # a cold build compiles grpc-go: about 30 s on 2 cores
RUN_S = 30

APP_MAIN = r"""// A user's program: Get, a Watch event, Put, a lock.
package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"

	cachecoordv1 "github.com/cachecoord/cachecoord/clients/go/cachecoordv1"
)

func fail(format string, args ...interface{}) {
	fmt.Printf("FAIL "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	target, prefix := os.Args[1], os.Args[2]
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	client := cachecoordv1.NewCacheCoordServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	user, err := client.Get(ctx, &cachecoordv1.GetRequest{Namespace: "users", Key: "1"})
	if err != nil || !strings.Contains(string(user.GetValue()), "Ada Lovelace") {
		fail("get users/1: %v %v", user, err)
	}
	fmt.Println("ok get: users/1")

	key := prefix + "a"
	watch, err := client.Watch(ctx, &cachecoordv1.WatchRequest{
		Namespaces: []string{"blobs"}, KeyPrefix: prefix,
	})
	if err != nil {
		fail("watch: %v", err)
	}
	first, err := watch.Recv()
	if err != nil || first.GetReset_() == nil {
		fail("first Watch event: %v %v", first, err)
	}
	fmt.Println("ok watch_reset")

	zero := int64(0)
	put, err := client.Put(ctx, &cachecoordv1.PutRequest{
		Namespace: "blobs", Key: key, Value: []byte("from go"), ExpectedVersion: &zero,
	})
	if err != nil {
		fail("put: %v", err)
	}
	got, err := client.Get(ctx, &cachecoordv1.GetRequest{Namespace: "blobs", Key: key})
	if err != nil || string(got.GetValue()) != "from go" || got.GetVersion() != put.GetVersion() {
		fail("get %s: %v %v", key, got, err)
	}
	fmt.Printf("ok put: blobs/%s version %d\n", key, put.GetVersion())

	for {
		event, err := watch.Recv()
		if err != nil {
			fail("watch: %v", err)
		}
		if inv := event.GetInvalidation(); inv != nil && inv.GetKey() == key {
			break
		}
	}
	fmt.Printf("ok watch_event: invalidation of blobs/%s\n", key)

	name := prefix + "lock"
	lock, err := client.AcquireLock(ctx, &cachecoordv1.AcquireLockRequest{Name: name, TtlMs: 5000})
	if err != nil || lock.GetToken() == "" || lock.GetFencingToken() <= 0 {
		fail("acquire: %v %v", lock, err)
	}
	release := &cachecoordv1.ReleaseLockRequest{Name: name, Token: lock.GetToken()}
	if _, err := client.ReleaseLock(ctx, release); err != nil {
		fail("release: %v", err)
	}
	fmt.Printf("ok lock: fencing token %d\n", lock.GetFencingToken())
	fmt.Printf("RESULT {\"key\": %q, \"version\": %d}\n", key, put.GetVersion())
}
"""


async def _run(*argv: str | Path, cwd: Path, env: dict[str, str], limit: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        raw, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    output = raw.decode()
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{output}"
    return output


def _go_env(gopath: Path) -> dict[str, str]:
    go = shutil.which("go")
    assert go, "go is not installed: run `make debian-tools` (Debian's golang-go)"
    grpc = DEBIAN_GOPATH / "src" / "google.golang.org" / "grpc"
    assert grpc.is_dir(), f"{grpc} is missing: run `make debian-tools`"
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:{DEBIAN_GOPATH}",
        "GOPROXY": "off",
        "GOFLAGS": "",
    }


@pytest.mark.timeout(2 * BUILD_S + 3 * RUN_S + 30)
async def test_go_client_builds_and_runs_against_the_server(
    app: App, client: AsyncClient, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    gopath = tmp_path / "gopath"
    env = _go_env(gopath)
    # As the README installs it: the module's folder at its import path.
    shutil.copytree(GO_DIR, gopath / "src" / MODULE)
    program = gopath / "src" / "example.com" / "cachecoordapp"
    program.mkdir(parents=True)
    (program / "main.go").write_text(APP_MAIN)
    bin_dir = tmp_path / "bin"
    packages = (f"{MODULE}/examples/getuser", f"{MODULE}/examples/holdlock")
    for package in (*packages, "example.com/cachecoordapp"):
        name = package.rsplit("/", 1)[1]
        await _run(
            "go", "build", "-o", bin_dir / name, package, cwd=tmp_path, env=env, limit=BUILD_S
        )
    await _run("go", "vet", f"{MODULE}/...", cwd=tmp_path, env=env, limit=BUILD_S)

    target = f"127.0.0.1:{app.port}"
    output = await _run(bin_dir / "getuser", target, cwd=tmp_path, env=env, limit=RUN_S)
    assert "Ada Lovelace" in output, output

    prefix = f"go-{uuid.uuid4().hex[:12]}-"
    output = await _run(
        bin_dir / "cachecoordapp", target, prefix, cwd=tmp_path, env=env, limit=RUN_S
    )
    print(output)  # the program's checks, shown with -s or on failure
    lines = output.splitlines()
    for check in ("get", "watch_reset", "put", "watch_event", "lock"):
        assert any(line.startswith(f"ok {check}") for line in lines), f"no {check}: {output}"
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[7:])
    got = await client.get("blobs", result["key"])
    assert got.found
    assert got.value == b"from go"
    assert got.version == result["version"]
    # Its hold-lock example keeps a lock across connection recycling.
    await held_across_recycling(
        [bin_dir / "holdlock"],
        postgres_server,
        tmp_path,
        held=b"holding",
        released=b"held throughout, released",
    )
