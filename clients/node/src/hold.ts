import { status } from "@grpc/grpc-js";
import type { ClientDuplexStream, Metadata, ServiceError } from "@grpc/grpc-js";

import type {
  CacheCoordServiceClient,
  HoldLockRequest,
  HoldLockResponse,
} from "./gen/cachecoord/v1/cachecoord";

/** What to hold: the fields of HoldLockRequest.Acquire (resumable is set for you). */
export interface HoldOptions {
  name: string;
  ttlMs: bigint;
  waitTimeoutMs?: bigint;
}

/** A lock held by `holdLock` until `release()`, resumed across connection recycling. */
export interface HeldLock {
  readonly name: string;
  readonly token: string;
  readonly fencingToken: bigint;
  /** Resolves (never rejects) with the reason the moment the lock is lost: stop using the resource. */
  readonly lost: Promise<Error>;
  /** Let go: half-close the stream and wait for its end; rejects if the lock had been lost. */
  release(): Promise<void>;
}

type HoldStream = ClientDuplexStream<HoldLockRequest, HoldLockResponse>;

const RETRYABLE = new Set<number>([status.UNAVAILABLE, status.RESOURCE_EXHAUSTED, status.DEADLINE_EXCEEDED]);

/**
 * Take a lock with a HoldLock stream and keep it across connection recycling.
 *
 * The server sends `handoff` when it is about to close the stream's
 * connection (max_connection_age, a drain, SIGTERM); this helper then opens a
 * new stream that starts with `resume` (same token, same fencing token)
 * before `handoff.validForMs` runs out, retrying on UNAVAILABLE. If the stream
 * says `lost`, breaks without a handoff, or cannot be resumed in time, `lost`
 * resolves at once.
 *
 * ```ts
 * const lock = await holdLock(client, md, { name: "nightly", ttlMs: 30_000n });
 * lock.lost.then((why) => abortTheWork(why));
 * try { await work(lock.fencingToken); } finally { await lock.release(); }
 * ```
 */
export function holdLock(
  client: CacheCoordServiceClient,
  metadata: Metadata,
  options: HoldOptions,
): Promise<HeldLock> {
  const { name, ttlMs } = options;
  let stream: HoldStream = client.holdLock(metadata);
  let leaving = false;
  let handedOff = false;
  let failure: Error | undefined;
  let ended: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (ended = resolve));
  let markLost: (why: Error) => void = () => undefined;
  const lost = new Promise<Error>((resolve) => (markLost = resolve));
  const fail = (why: Error) => {
    failure ??= why;
    markLost(why);
    ended();
  };

  return new Promise<HeldLock>((resolveHeld, rejectHeld) => {
    let held: HeldLock | undefined;

    const follow = (current: HoldStream, onAcquired: (reply: HoldLockResponse) => void) => {
      let handoff: bigint | undefined;
      let wasLost = false;
      let acquired = false; // until then, errors belong to whoever opened the stream
      current.on("data", (reply: HoldLockResponse) => {
        const kind = reply.kind;
        if (kind?.$case === "acquired") {
          acquired = true;
          onAcquired(reply);
        } else if (kind?.$case === "lost") {
          wasLost = true;
          fail(new Error(`lock ${name} was lost while held`));
        } else if (kind?.$case === "handoff") handoff = kind.value.validForMs;
      });
      current.on("error", (error: ServiceError) => {
        if (!held) rejectHeld(error);
        else if (!acquired) return;
        else if (!(leaving && error.code === status.CANCELLED)) fail(error);
        else ended();
      });
      current.on("end", () => {
        if (!held || !acquired || wasLost) return;
        if (handoff === undefined) {
          if (leaving) ended();
          else fail(new Error(`the stream holding lock ${name} ended without a handoff`));
        } else if (leaving) {
          handedOff = true;
          ended();
        } else {
          void resume(Date.now() + Number(handoff) * 0.99 - 5);
        }
      });
    };

    const resume = async (validUntil: number) => {
      let retryIn = 20;
      while (Date.now() < validUntil) {
        const next: HoldStream = client.holdLock(metadata);
        stream = next;
        const outcome = await new Promise<"ok" | "retry" | Error>((settle) => {
          const timer = setTimeout(() => {
            next.cancel();
            settle(new Error(`lock ${name} could not be resumed before it expired`));
          }, Math.max(0, validUntil - Date.now()));
          next.once("error", (error: ServiceError) => {
            clearTimeout(timer);
            settle(RETRYABLE.has(error.code) ? "retry" : error);
          });
          follow(next, (reply) => {
            clearTimeout(timer);
            const same = reply.kind?.$case === "acquired" && reply.kind.value.fencingToken === held?.fencingToken;
            settle(same ? "ok" : new Error(`lock ${name} was lost while handed off`));
          });
          next.write({ kind: { $case: "resume", value: { name, token: held?.token ?? "", ttlMs } } });
        });
        if (outcome === "ok") {
          if (leaving) next.end();
          return;
        }
        if (outcome instanceof Error) return fail(outcome);
        await new Promise((wake) => setTimeout(wake, Math.min(retryIn, Math.max(0, validUntil - Date.now()))));
        retryIn = Math.min(retryIn * 2, 500);
      }
      fail(new Error(`lock ${name} could not be resumed before it expired`));
    };

    follow(stream, (reply) => {
      if (held || reply.kind?.$case !== "acquired") return;
      const { token, fencingToken } = reply.kind.value;
      held = {
        name,
        token,
        fencingToken,
        lost,
        release: async () => {
          leaving = true;
          stream.end();
          await done;
          if (!failure && handedOff) {
            await new Promise<void>((resolve, reject) =>
              client.releaseLock({ name, token }, metadata, (error) => (error ? reject(error) : resolve())),
            );
          }
          if (failure) throw failure;
        },
      };
      resolveHeld(held);
    });
    stream.write({
      kind: {
        $case: "acquire",
        value: { name, ttlMs, waitTimeoutMs: options.waitTimeoutMs ?? 0n, resumable: true },
      },
    });
  });
}
