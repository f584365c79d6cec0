// Shared by the k6 scripts: where the service is, the optional API key, and the stages.
// Environment: BASE_URL (default http://127.0.0.1:8000; several, comma-separated, are API replicas:
// BASE_URLS, which goodput.js takes in turn), API_KEY (sent as X-API-Key when set), VUS (default 10),
// RAMP_UP (30s), HOLD (1m), RAMP_DOWN (10s). A 1-minute smoke:
//   k6 run -e RAMP_UP=10s -e HOLD=40s -e RAMP_DOWN=10s k6/load.js
import { SharedArray } from 'k6/data';

export const BASE_URLS = (__ENV.BASE_URL || 'http://127.0.0.1:8000').split(',').map((u) => u.replace(/\/$/, ''));
export const BASE_URL = BASE_URLS[0];

export function headers() {
  const h = { 'Content-Type': 'application/json' };
  if (__ENV.API_KEY) {
    h['X-API-Key'] = __ENV.API_KEY;
  }
  return h;
}

export function stages() {
  const vus = parseInt(__ENV.VUS || '10', 10);
  return [
    { duration: __ENV.RAMP_UP || '30s', target: vus },
    { duration: __ENV.HOLD || '1m', target: vus },
    { duration: __ENV.RAMP_DOWN || '10s', target: 0 },
  ];
}

// The seeds' fixed texts: the requests that repeat them are cache hits after their first answer.
export const FIXED_TEXTS = [
  'I love this product, it works great!',
  'This is the worst purchase I have ever made.',
  'The movie was okay, nothing special.',
  'Absolutely fantastic experience, highly recommend.',
  'Terrible customer service and a broken item.',
];

export function shuffled(items) {
  const out = items.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

// Sentences from DATA (a file, one per line, a TSV's first column; a header line `text` skipped), else
// a few built in: call once, in a script's init context (k6's SharedArray).
export function sentences() {
  return new SharedArray('sentences', () =>
    __ENV.DATA
      ? open(__ENV.DATA).split('\n').map((l) => l.split('\t')[0].trim()).filter((l) => l && l !== 'text')
      : ['a quietly moving film', 'the plot never comes together', 'sharp, funny and warm', 'a tedious mess'],
  );
}

// The k-th never-sent text of this test (no cache hit: each one costs a forward): a sentence, then
// whitespace that spells the VU, k and the time in binary (space 0, tab 1, a newline between), which
// the tokenizer drops: the text costs the model what its sentence costs, as the bench's texts do
// (benchmarks/workload.py, `UniqueTexts`), while its cache key is new. A visible tag such as
// " #3-41-1764240000000" made an SST-2 train sentence 25 tokens on average instead of 13.
export function uniqueText(sentencesArray, k, vu) {
  const spell = (n) => n.toString(2).replaceAll('0', ' ').replaceAll('1', '\t');
  return `${sentencesArray[k % sentencesArray.length]}${[vu, k, Date.now()].map(spell).join('\n')}`;
}
