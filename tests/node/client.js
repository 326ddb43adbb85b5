// A klservice client in Node.js (@grpc/grpc-js), used by tests/server/test_tls.py.
//
// Usage: node client.js '{"target": ..., "proto_root": ..., "ca": PATH, "cert": PATH?, "key": PATH?,
//                         "token": TOKEN?, "tokens": [..], "prompt_length": N}'
// Prints one JSON line: {"model": ..., "vocab_size": ..., "ref_logprobs": [...]} or {"error": CODE, "details": ...}.
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const args = JSON.parse(process.argv[2]);
const definition = protoLoader.loadSync("klservice/v1/klservice.proto", {
  includeDirs: [args.proto_root], keepCase: true, longs: String, enums: String, defaults: true,
});
const v1 = grpc.loadPackageDefinition(definition).klservice.v1;
const read = (file) => (file ? fs.readFileSync(path.resolve(file)) : null);
const credentials = grpc.credentials.createSsl(read(args.ca), read(args.key), read(args.cert));
const client = new v1.ReferenceService(args.target, credentials);
const metadata = new grpc.Metadata();
metadata.add("x-job-id", "node-client");
if (args.token) metadata.add("authorization", `Bearer ${args.token}`);
const deadline = () => new Date(Date.now() + 30000);

function int64Tensor(values) {
  const data = Buffer.alloc(8 * values.length);
  values.forEach((value, i) => data.writeBigInt64LE(BigInt(value), 8 * i));
  return { dtype: "DTYPE_INT64", shape: [values.length], data };
}

function fail(error) {
  console.log(JSON.stringify({ error: grpc.status[error.code], details: error.details }));
  process.exit(0);
}

client.GetModelInfo({}, metadata, { deadline: deadline() }, (error, info) => {
  if (error) return fail(error);
  const batch = {
    token_ids: int64Tensor(args.tokens),
    lengths: int64Tensor([args.tokens.length]),
    prompt_lengths: int64Tensor([args.prompt_length]),
  };
  client.Score({ request_id: "node-1", batch }, metadata, { deadline: deadline() }, (error, reply) => {
    if (error) return fail(error);
    const data = reply.ref_logprobs.data;
    const values = [];
    for (let i = 0; i < data.length; i += 4) values.push(data.readFloatLE(i));
    console.log(JSON.stringify({ model: info.name, vocab_size: Number(info.vocab_size), request_id: reply.request_id,
                                 ref_logprobs: values }));
    process.exit(0);
  });
});
