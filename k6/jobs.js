// Bulk jobs: each iteration submits a job of JOB_TEXTS (default 20) texts to /jobs and polls it to
// the end. Thresholds: every job finishes; submissions answer fast (p99 < 2 s).
import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter } from 'k6/metrics';
import { BASE_URL, headers, stages } from './lib.js';

const JOB_TEXTS = parseInt(__ENV.JOB_TEXTS || '20', 10);
const POLL_S = parseFloat(__ENV.POLL_S || '0.2');
const TIMEOUT_S = parseFloat(__ENV.JOB_TIMEOUT_S || '120');
const unfinished = new Counter('jobs_unfinished');

export const options = {
  stages: stages(),
  thresholds: {
    'http_req_duration{name:submit}': ['p(99)<2000'],
    jobs_unfinished: ['count==0'],
    checks: ['rate>0.99'],
  },
};

export default function () {
  const n = exec.scenario.iterationInTest;
  const texts = Array.from({ length: JOB_TEXTS }, (_, i) => `bulk review ${n}-${i}: a fine, if long, film`);
  const submit = http.post(`${BASE_URL}/jobs`, JSON.stringify({ text: texts }), {
    headers: headers(),
    tags: { name: 'submit' },
  });
  if (!check(submit, { 'job accepted (202)': (r) => r.status === 202 })) {
    return;
  }
  const statusUrl = `${BASE_URL}/jobs/${submit.json('job_id')}`;
  const giveUp = Date.now() + TIMEOUT_S * 1000;
  let view = null;
  while (Date.now() < giveUp) {
    const res = http.get(statusUrl, { headers: headers(), tags: { name: 'poll' } });
    view = res.status === 200 ? res.json() : null;
    if (view && (view.status === 'finished' || view.status === 'failed')) {
      break;
    }
    sleep(POLL_S);
  }
  const done = check(view, {
    'job finished': (v) => v !== null && v.status === 'finished',
    'a prediction per text': (v) => v !== null && v.predictions && v.predictions.length === JOB_TEXTS,
  });
  if (!done) {
    unfinished.add(1);
  }
}
