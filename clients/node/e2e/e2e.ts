// End-to-end check of the generated stubs against a running cachecoord, run
// by tests/integration/test_node_client.py:
//   node dist/e2e/e2e.js HOST:PORT KEY_PREFIX
// Prints one "ok <check>: <detail>" line per check, then "RESULT <json>" with
// what it wrote (the Python test reads it back), and exits 0; on the first
// failed check it prints "FAIL <check>: <why>" and exits 1. Every call sends
// a W3C traceparent header and has a deadline.
import { strict as assert } from "node:assert";

import { credentials, Metadata, status, type ClientReadableStream } from "@grpc/grpc-js";

import {
  AcquireLockRequest,
  BatchGetRequest,
  CacheCoordServiceClient,
  GetRequest,
  type HoldLockRequest,
  PutRequest,
  WatchRequest,
  HoldLockRequest_Acquire,
  type HoldLockResponse,
  type WatchResponse,
  traceparent,
  unary,
} from "../src";

const [target, prefix] = process.argv.slice(2);
const TRACEPARENT = traceparent();

/** Metadata of every call: a traceparent header, for tracing tests to come. */
function metadata(): Metadata {
  const md = new Metadata();
  md.set("traceparent", TRACEPARENT);
  return md;
}

function options(): { deadline: Date } {
  return { deadline: new Date(Date.now() + 5_000) };
}

let current = "";
function check(name: string, detail: string): void {
  console.log(`ok ${name}: ${detail}`);
  current = "";
}

/** Buffers a stream's messages so that a test can await them one by one. */
class StreamReader<T> {
  private readonly items: T[] = [];
  private waiter: (() => void) | null = null;
  private error: Error | null = null;
  private ended = false;

  constructor(stream: NodeJS.EventEmitter) {
    stream.on("data", (item: T) => this.push(() => this.items.push(item)));
    stream.on("error", (err: Error) => this.push(() => (this.error = err)));
    stream.on("end", () => this.push(() => (this.ended = true)));
  }

  private push(change: () => void): void {
    change();
    this.waiter?.();
    this.waiter = null;
  }

  /** The next message, or null once the stream ended; rejects on an error
   * status or when nothing came within timeoutMs. */
  async next(timeoutMs = 5_000): Promise<T | null> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const item = this.items.shift();
      if (item !== undefined) return item;
      if (this.error) throw this.error;
      if (this.ended) return null;
      const left = until - Date.now();
      if (left <= 0) throw new Error(`no stream message within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }
}

async function run(client: CacheCoordServiceClient): Promise<Record<string, unknown>> {
  current = "get";
  const user = await unary(client.get.bind(client), GetRequest.fromPartial({ namespace: "users", key: "1" }), metadata(), options());
  assert.ok(user.found, "users/1 not found");
  const row = JSON.parse(Buffer.from(user.value).toString("utf8")) as { name?: unknown };
  assert.equal(row.name, "Ada Lovelace");
  check("get", `users/1 name=${String(row.name)} version=${user.version}`);

  current = "batch_get";
  const batch = await unary(
    client.batchGet.bind(client),
    BatchGetRequest.fromPartial({ namespace: "users", keys: ["1", "0", "2"] }),
    metadata(),
    options(),
  );
  assert.deepEqual(
    batch.entries.map((e) => [e.key, e.found]),
    [
      ["1", true],
      ["0", false],
      ["2", true],
    ],
  );
  const alan = JSON.parse(Buffer.from(batch.entries[2].value).toString("utf8")) as { name?: unknown };
  assert.equal(alan.name, "Alan Turing");
  check("batch_get", "users 1, 0, 2 -> found, missing, found (Alan Turing)");

  current = "watch";
  const key = `${prefix}a`;
  const watch: ClientReadableStream<WatchResponse> = client.watch(
    WatchRequest.fromPartial({ namespaces: ["blobs"], keyPrefix: prefix }),
    metadata(),
  );
  const events = new StreamReader<WatchResponse>(watch);
  const first = await events.next();
  assert.equal(first?.event?.$case, "reset", `first Watch event: ${JSON.stringify(first?.event)}`);
  assert.equal(first.event.value.reason, "subscribed");
  check("watch_reset", "first event is RESET (subscribed)");

  current = "put";
  const put1 = await unary(
    client.put.bind(client),
    PutRequest.fromPartial({ namespace: "blobs", key, value: Buffer.from("hello from node"), expectedVersion: 0n }),
    metadata(),
    options(),
  );
  assert.ok(put1.version > 0n, `version ${put1.version}`);
  const read1 = await unary(client.get.bind(client), GetRequest.fromPartial({ namespace: "blobs", key }), metadata(), options());
  assert.ok(read1.found);
  assert.equal(Buffer.from(read1.value).toString("utf8"), "hello from node");
  assert.equal(read1.version, put1.version);
  const put2 = await unary(
    client.put.bind(client),
    PutRequest.fromPartial({ namespace: "blobs", key, value: Buffer.from("hello again"), expectedVersion: put1.version }),
    metadata(),
    options(),
  );
  assert.ok(put2.version > put1.version, `${put2.version} after ${put1.version}`);
  const read2 = await unary(client.get.bind(client), GetRequest.fromPartial({ namespace: "blobs", key }), metadata(), options());
  assert.equal(Buffer.from(read2.value).toString("utf8"), "hello again");
  assert.equal(read2.version, put2.version);
  check("put_get", `blobs/${key} versions ${put1.version} then ${put2.version}, Get sees each`);

  current = "compare_and_set";
  const stale = await unary(
    client.put.bind(client),
    PutRequest.fromPartial({ namespace: "blobs", key, value: Buffer.from("lost"), expectedVersion: put1.version }),
    metadata(),
    options(),
  ).then(
    () => null,
    (err: { code?: number }) => err.code ?? null,
  );
  assert.equal(stale, status.FAILED_PRECONDITION);
  check("compare_and_set", "stale expected_version -> FAILED_PRECONDITION");

  current = "watch_event";
  let change: WatchResponse | null;
  do {
    // Skip heartbeats and whole-namespace invalidations of other tests.
    change = await events.next();
  } while (change?.event?.$case !== "invalidation" || change.event.value.key !== key);
  assert.equal(change.event.value.namespace, "blobs");
  assert.equal(change.event.value.reason, "put");
  assert.equal(change.event.value.version, put1.version);
  check("watch_event", `invalidation of blobs/${key} (put, version ${put1.version})`);

  current = "invalidate";
  const dropped = await unary(
    client.invalidate.bind(client),
    { namespace: "blobs", keys: [key], all: false },
    metadata(),
    options(),
  );
  assert.ok(dropped.invalidated >= 0n);
  check("invalidate", `blobs/${key} dropped ${dropped.invalidated} cached entries`);
  watch.cancel();

  current = "lock";
  const name = `${prefix}lock`;
  const lock = await unary(
    client.acquireLock.bind(client),
    AcquireLockRequest.fromPartial({ name, ttlMs: 10_000n, waitTimeoutMs: 0n }),
    metadata(),
    options(),
  );
  assert.ok(lock.token.length > 0 && lock.fencingToken > 0n);
  const busy = await unary(
    client.acquireLock.bind(client),
    AcquireLockRequest.fromPartial({ name, ttlMs: 10_000n, waitTimeoutMs: 0n }),
    metadata(),
    options(),
  ).then(
    () => null,
    (err: { code?: number }) => err.code ?? null,
  );
  assert.equal(busy, status.ABORTED);
  await unary(client.releaseLock.bind(client), { name, token: lock.token }, metadata(), options());
  check("lock", `AcquireLock fencing ${lock.fencingToken}, held -> ABORTED, ReleaseLock`);

  current = "hold_lock";
  const hold = client.holdLock(metadata(), options());
  const held = new StreamReader<HoldLockResponse>(hold);
  const acquire: HoldLockRequest = {
    kind: {
      $case: "acquire",
      // fromPartial: the fields left out take their defaults.
      value: HoldLockRequest_Acquire.fromPartial({ name, ttlMs: 10_000n, waitTimeoutMs: 2_000n }),
    },
  };
  hold.write(acquire);
  const acquired = await held.next();
  assert.equal(acquired?.kind?.$case, "acquired");
  const fencing = acquired.kind.value.fencingToken;
  assert.ok(fencing > lock.fencingToken, `fencing ${fencing} after ${lock.fencingToken}`);
  hold.end(); // half-close: the server releases the lock and ends the stream OK
  assert.equal(await held.next(), null);
  const again = await unary(
    client.acquireLock.bind(client),
    AcquireLockRequest.fromPartial({ name, ttlMs: 10_000n, waitTimeoutMs: 0n }),
    metadata(),
    options(),
  );
  await unary(client.releaseLock.bind(client), { name, token: again.token }, metadata(), options());
  check("hold_lock", `HoldLock fencing ${fencing}, released on half-close`);

  return { key, version: put2.version.toString(), traceparent: TRACEPARENT };
}

async function main(): Promise<number> {
  if (!target || !prefix) {
    console.error("usage: node dist/e2e/e2e.js HOST:PORT KEY_PREFIX");
    return 2;
  }
  const client = new CacheCoordServiceClient(target, credentials.createInsecure());
  try {
    const result = await run(client);
    console.log(`RESULT ${JSON.stringify(result)}`);
    return 0;
  } catch (err: unknown) {
    console.log(`FAIL ${current}: ${err instanceof Error ? err.message : String(err)}`);
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
