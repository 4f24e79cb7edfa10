import { randomBytes } from "node:crypto";

import type { CallOptions, ClientUnaryCall, Metadata, ServiceError } from "@grpc/grpc-js";

/** The callback form of a generated unary method, as taken by `unary`. */
export type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/**
 * Call a generated unary method and return a promise of its response.
 * Pass the method bound to its client and always a deadline:
 * `await unary(client.get.bind(client), request, metadata, { deadline })`.
 * A failed call rejects with the grpc-js ServiceError (`code`, `details`).
 */
export function unary<Req, Res>(
  method: UnaryMethod<Req, Res>,
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    method(request, metadata, options, (error, response) => {
      if (error) reject(error);
      else resolve(response);
    });
  });
}

/**
 * A W3C Trace Context `traceparent` header value for a new sampled trace
 * (version 00, random trace and parent ids). Send it as metadata so that the
 * server's spans join the caller's trace.
 */
export function traceparent(): string {
  return `00-${randomBytes(16).toString("hex")}-${randomBytes(8).toString("hex")}-01`;
}
