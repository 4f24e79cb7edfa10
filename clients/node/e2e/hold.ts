// Holds a lock with holdLock() for a while against a server that recycles its
// connections, checking that it is never lost; tests/integration/test_node_client.py
// runs it (compiled by `make node-client`) while a Python client tries to take it.
// Usage: node dist/e2e/hold.js TARGET NAME SECONDS

import { credentials, Metadata } from "@grpc/grpc-js";

import { CacheCoordServiceClient, holdLock } from "../src";

const [target, name, seconds] = process.argv.slice(2);

async function main(): Promise<void> {
  const client = new CacheCoordServiceClient(target, credentials.createInsecure());
  const lock = await holdLock(client, new Metadata(), { name, ttlMs: 2_000n, waitTimeoutMs: 5_000n });
  console.log(`held ${lock.fencingToken}`);
  let lost: Error | undefined;
  void lock.lost.then((why) => (lost = why));
  await new Promise((resolve) => setTimeout(resolve, Number(seconds) * 1000));
  if (lost !== undefined) throw new Error(`lost while held: ${lost.message}`);
  await lock.release();
  console.log(`released ${lock.fencingToken}`);
  client.close();
}

main().catch((err: unknown) => {
  console.log(`FAIL ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
