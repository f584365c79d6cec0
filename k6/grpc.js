// The Open Inference Protocol over gRPC: ramp to VUS virtual users, hold, ramp down. Each iteration
// sends one ModelInfer of the fixed texts (cache hits after their first answer) or, UNIQUE_RATE
// (default 0.05) of the time, of texts with their words shuffled (new to the cache, so they reach
// the model), with the service's own deadline. Environment, besides lib.js's: GRPC_ADDRESS (default
// 127.0.0.1:8001); BASE_URL names the model (GET /model). Thresholds: p99 < 2 s, every call OK.
import http from 'k6/http';
import grpc from 'k6/net/grpc';
import encoding from 'k6/encoding';
import { check } from 'k6';
import { BASE_URL, FIXED_TEXTS, headers, shuffled, stages } from './lib.js';

const ADDRESS = __ENV.GRPC_ADDRESS || '127.0.0.1:8001';
const UNIQUE_RATE = parseFloat(__ENV.UNIQUE_RATE || '0.05');
const client = new grpc.Client();
client.load(['../api/grpc_v2'], 'grpc_predict_v2.proto');

export const options = {
  stages: stages(),
  thresholds: {
    grpc_req_duration: ['p(99)<2000'],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  return { model: http.get(`${BASE_URL}/model`, { headers: headers() }).json('name') };
}

export default function (data) {
  if (__ITER === 0) {
    client.connect(ADDRESS, { plaintext: true });
  }
  const unique = Math.random() < UNIQUE_RATE;
  const texts = unique ? shuffled(FIXED_TEXTS).map((t) => shuffled(t.split(' ')).join(' ')) : FIXED_TEXTS;
  const request = {
    model_name: data.model,
    inputs: [
      {
        name: 'text',
        datatype: 'BYTES',
        shape: [texts.length],
        contents: { bytes_contents: texts.map((t) => encoding.b64encode(t)) },
      },
    ],
  };
  const metadata = __ENV.API_KEY ? { 'x-api-key': __ENV.API_KEY } : {};
  const res = client.invoke('inference.GRPCInferenceService/ModelInfer', request, {
    metadata,
    timeout: '10s',
    tags: { name: 'ModelInfer', cache: unique ? 'shuffled' : 'repeat' },
  });
  check(res, {
    'ModelInfer OK': (r) => r && r.status === grpc.StatusOK,
    'label and scores': (r) => r && r.status === grpc.StatusOK && r.message.outputs.length === 2,
  });
}
