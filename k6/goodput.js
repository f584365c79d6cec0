// Goodput under an open loop: requests arrive at RATE a second whatever the service's pace (k6's
// constant-arrival-rate), each with never-sent texts (a forward each), carrying its deadline
// (X-Request-Timeout: DEADLINE_S) and given up once that has passed, as a caller with a deadline does.
// `goodput` counts the answers that came in time (its rate is the goodput a second); every other
// answer must be one the service promises: 503 or 429 with Retry-After (`refused`, timed in
// `refusal_duration`), or a 504 or the client giving up at the deadline (`late`). Threshold: every
// answer one of those. Environment: RATE (requests/s, default 20), HOLD (1m), DEADLINE_S (1),
// TEXTS_PER_REQUEST (1), DATA (sentences, as unique.js), PREALLOCATED_VUS (1000). Set RATE from the
// saturation the bench measures (`sentiment bench --only goodput`): 1x, 2x and 3x of it.
import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { BASE_URLS, headers, sentences, uniqueText } from './lib.js';

const RATE = parseInt(__ENV.RATE || '20', 10);
const DEADLINE_S = parseFloat(__ENV.DEADLINE_S || '1');
const PER_REQUEST = parseInt(__ENV.TEXTS_PER_REQUEST || '1', 10);
const SENTENCES = sentences();
// A request holds its VU at most its deadline: this many VUs keep every arrival on time. At most
// PREALLOCATED_VUS of them are made before the test, the rest as arrivals find none free (all 9,400
// made first, for a tiny model's 6,300/s, took 9 s of k6's CPU, and its 1 s point sent nothing).
const VUS = Math.max(2, Math.ceil(RATE * DEADLINE_S * 1.5));
const PREALLOCATED_VUS = Math.min(VUS, parseInt(__ENV.PREALLOCATED_VUS || '1000', 10));

const goodput = new Counter('goodput');
const refused = new Counter('refused');
const late = new Counter('late');
const refusalDuration = new Trend('refusal_duration', true);

export const options = {
  scenarios: {
    goodput: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.HOLD || '1m',
      preAllocatedVUs: PREALLOCATED_VUS,
      maxVUs: 2 * VUS,
    },
  },
  thresholds: { checks: ['rate>0.99'] },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const texts = [];
  for (let i = 0; i < PER_REQUEST; i++) {
    texts.push(uniqueText(SENTENCES, n * PER_REQUEST + i, exec.vu.idInTest));
  }
  const params = {
    headers: { ...headers(), 'X-Request-Timeout': `${DEADLINE_S}` },
    timeout: `${Math.round(DEADLINE_S * 1000)}ms`,
    responseCallback: http.expectedStatuses(200),
  };
  const api = BASE_URLS[n % BASE_URLS.length]; // API replicas in turn, as a Service spreads them
  const res = http.post(`${api}/predict`, JSON.stringify({ text: texts }), params);
  const inTime = res.status === 200 && res.timings.duration <= DEADLINE_S * 1000;
  const refusal = (res.status === 503 || res.status === 429) && Boolean(res.headers['Retry-After']);
  // Late: a 504, the client's timeout at the deadline (k6's error 1050), or a 200 a moment past it.
  const lateAnswer = res.status === 504 || (res.status === 0 && res.error_code === 1050) || res.status === 200;
  if (inTime) {
    goodput.add(texts.length);
  } else if (refusal) {
    refused.add(1);
    refusalDuration.add(res.timings.duration);
  } else if (lateAnswer) {
    late.add(1);
  }
  check(res, { 'in time, refused with Retry-After, or late': () => inTime || refusal || lateAnswer });
}
