// Calls recserve.v1.Recommender/Recommend with @grpc/grpc-js, using only the .proto
// files: usage `node recommend.js TARGET INCLUDE_DIRS USER_ID K [MODEL]`, where
// INCLUDE_DIRS (joined with the path delimiter) hold recserve/v1/*.proto and the
// google/rpc, google/api and google/protobuf protos it imports.
// Prints one JSON object: {"metadata": {...}, "items": [...], ...} or {"error": {...}};
// an error's google.rpc.Status (grpc-status-details-bin) is decoded with protobufjs
// into {"reason", "domain", "field_violations", "retry_delay_ms"}.
"use strict";
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [target, includeArg, userId, k, model] = process.argv.slice(2);
const includeDirs = includeArg.split(path.delimiter);
const definition = protoLoader.loadSync(path.join("recserve", "v1", "recommender.proto"), {
  includeDirs,
  keepCase: true,
  longs: String,
  defaults: true,
});
const recserve = grpc.loadPackageDefinition(definition).recserve.v1;

// google.rpc.Status and its details, from the same include folders.
const rpc = new protobuf.Root();
rpc.resolvePath = (origin, file) => {
  for (const dir of includeDirs) {
    const full = path.join(dir, file);
    if (fs.existsSync(full)) return full;
  }
  return file;
};
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
const Status = rpc.lookupType("google.rpc.Status");

function decodeStatus(metadata) {
  const raw = metadata.get("grpc-status-details-bin");
  if (!raw.length) return null;
  const status = Status.decode(raw[0]);
  const out = { code: status.code, field_violations: [] };
  for (const any of status.details) {
    const type = rpc.lookupType(any.type_url.slice(any.type_url.lastIndexOf("/") + 1));
    const detail = type.toObject(type.decode(any.value), { longs: Number });
    if (type.name === "ErrorInfo") {
      out.reason = detail.reason;
      out.domain = detail.domain;
    } else if (type.name === "BadRequest") {
      out.field_violations = (detail.field_violations || detail.fieldViolations || []).map((v) => v.field);
    } else if (type.name === "RetryInfo") {
      const d = detail.retry_delay || detail.retryDelay || {};
      out.retry_delay_ms = (d.seconds || 0) * 1000 + (d.nanos || 0) / 1e6;
    }
  }
  return out;
}

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
    finish({ error: { code: err.code, details: err.details, status: decodeStatus(err.metadata) } });
    return;
  }
  response = resp;
  maybeFinish();
});
call.on("status", (status) => {
  const map = status.metadata.getMap();
  delete map["grpc-status-details-bin"];
  trailers = map;
  maybeFinish();
});
