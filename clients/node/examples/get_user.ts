// Read key "1" of namespace "users" and print its JSON.
// Build, then run with a server on 127.0.0.1:50051 (or pass host:port):
//   npm run build && node dist/examples/get_user.js [127.0.0.1:50051]
import { credentials, Metadata } from "@grpc/grpc-js";

import { CacheCoordServiceClient, GetRequest, GetResponse, layerToJSON, unary } from "../src";

async function main(): Promise<number> {
  const target = process.argv[2] ?? "127.0.0.1:50051";
  const client = new CacheCoordServiceClient(target, credentials.createInsecure());
  try {
    // Always give a deadline: a call without one can wait forever.
    const deadline = new Date(Date.now() + 5_000);
    const user: GetResponse = await unary(
      client.get.bind(client),
      // fromPartial: fields added to the request by later releases take their defaults.
      GetRequest.fromPartial({ namespace: "users", key: "1" }),
      new Metadata(),
      { deadline },
    );
    if (!user.found) {
      console.error('no key "1" in namespace "users"');
      return 1;
    }
    // Mapped namespaces hold a JSON object with the row's columns.
    const row: unknown = JSON.parse(Buffer.from(user.value).toString("utf8"));
    console.log(JSON.stringify(row, null, 2));
    console.log(`version ${user.version}, layer ${layerToJSON(user.layer)}, stale ${user.stale}`);
    return 0;
  } finally {
    client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`cachecoord: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
