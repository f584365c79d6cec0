// The seeds' scenario: ramp to 10 virtual users, hold, ramp down. Each iteration checks /health
// and sends one /predict: CACHE_RATE (default 0.95) of them repeat the fixed list of texts (cache
// hits), the rest send a shuffled list whose texts have their words shuffled too, so they are new
// to the per-text cache and reach the model. Threshold: p99 < 2 s.
import http from 'k6/http';
import { check } from 'k6';
import { BASE_URL, FIXED_TEXTS, headers, shuffled, stages } from './lib.js';

const CACHE_RATE = parseFloat(__ENV.CACHE_RATE || '0.95');

export const options = {
  stages: stages(),
  thresholds: {
    http_req_duration: ['p(99)<2000'],
    checks: ['rate>0.99'],
  },
};

export default function () {
  const health = http.get(`${BASE_URL}/health`, { tags: { name: 'health' } });
  check(health, { 'health 200': (r) => r.status === 200 });

  const cached = Math.random() < CACHE_RATE;
  const texts = cached ? FIXED_TEXTS : shuffled(FIXED_TEXTS).map((t) => shuffled(t.split(' ')).join(' '));
  const res = http.post(`${BASE_URL}/predict`, JSON.stringify({ text: texts }), {
    headers: headers(),
    tags: { name: 'predict', cache: cached ? 'repeat' : 'shuffled' },
  });
  check(res, {
    'predict 200': (r) => r.status === 200,
    'one prediction per text': (r) => r.status === 200 && r.json('predictions').length === texts.length,
  });
}
