// Calls recserve.v1.Recommender/Recommend with @grpc/grpc-js, using only the .proto
// files: usage `node recommend.js TARGET PROTO_ROOT USER_ID K [MODEL]`.
// Prints one JSON object: {"metadata": {...}, "items": [...], ...} or {"error": {...}}.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoRoot, userId, k, model] = process.argv.slice(2);
const definition = protoLoader.loadSync(path.join("recserve", "v1", "recommender.proto"), {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  defaults: true,
});
const recserve = grpc.loadPackageDefinition(definition).recserve.v1;
const client = new recserve.Recommender(target, grpc.credentials.createInsecure());
const deadline = new Date(Date.now() + 10000);
// Unary: the ranking arrives in one RecommendResponse, the x-recserve-* metadata
// as trailers (the "status" event). Print once both have arrived.
let response = null;
let trailers = null;
let done = false;
function finish(result) {
  if (done) return;
  done = true;
  console.log(JSON.stringify(result));
  client.close();
}
function maybeFinish() {
  if (response !== null && trailers !== null) {
    finish({ metadata: trailers, items: response.items, model: response.model, version: response.version });
  }
}
const call = client.Recommend({ user_id: userId, k: Number(k), model: model || "" }, { deadline }, (err, resp) => {
  if (err) {
    finish({ error: { code: err.code, details: err.details } });
    return;
  }
  response = resp;
  maybeFinish();
});
call.on("status", (status) => {
  trailers = status.metadata.getMap();
  maybeFinish();
});
