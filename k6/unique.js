// The model path: every /predict carries texts never sent before (no cache hits), so each one costs
// a model forward. TEXTS_PER_REQUEST (default 1); DATA: an optional file of sentences, one per line
// (else generated), each made unique by the test-wide iteration number. Threshold: p99 < 2 s.
import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { BASE_URL, headers, sentences, stages, uniqueText } from './lib.js';

const PER_REQUEST = parseInt(__ENV.TEXTS_PER_REQUEST || '1', 10);
const SENTENCES = sentences();

export const options = {
  stages: stages(),
  thresholds: { http_req_duration: ['p(99)<2000'], checks: ['rate>0.99'] },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const texts = [];
  for (let i = 0; i < PER_REQUEST; i++) {
    texts.push(uniqueText(SENTENCES, n * PER_REQUEST + i, exec.vu.idInTest));
  }
  const res = http.post(`${BASE_URL}/predict`, JSON.stringify({ text: texts }), { headers: headers() });
  check(res, {
    'predict 200': (r) => r.status === 200,
    'a cache miss': (r) => r.headers['X-Cache'] === 'miss',
  });
}
