#!/usr/bin/env node
/*
 * Score inputs with a ufad detector from Node.js (onnxruntime-node, CPU).
 *
 *   node score.js MODEL.onnx INPUTS.npy [MORE.npy ...] [--threshold T] [--batch-size N]
 *                 [--no-range-check] [--no-verify] [--threads N]
 *   node score.js MODEL.onnx --info        # the parsed ufad metadata as JSON
 *
 * Inputs are NumPy .npy files (float32 / float64 / uint8, C order; np.save writes them; int64 /
 * int32 for a detector that reads ids),
 * shaped like the model's input: [B, 1, 28, 28], [B, 28, 28] or one sample. Prints one JSON
 * object per input (JSON lines), the same fields as `ufad score --json`: index, pred, label,
 * score, is_anomaly, threshold, layer_scores, nonfinite_input, source, provider.
 * Higher score = more anomalous; is_anomaly = not (score <= threshold).
 * User mistakes print one line `error: ...` and exit 2.
 */
'use strict';

const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');
const fmt = require('./ufad_format.js');
const { parseNpy } = require('./npy.js');

const USAGE = 'usage: node score.js MODEL.onnx INPUTS.npy [...] [--threshold T] [--batch-size N] [--no-range-check] [--no-verify] [--threads N] | MODEL.onnx --info';

function fail(msg) {
  const e = new Error(msg);
  e.name = 'UfadError';
  return e;
}

function parseArgs(argv) {
  const opts = { files: [], threshold: null, batchSize: 1024, rangeCheck: true, verify: true, info: false, threads: 0 };
  const num = (flag, v, int) => {
    const inf = { inf: Infinity, '+inf': Infinity, '-inf': -Infinity }[String(v).toLowerCase()];
    const x = inf !== undefined && !int ? inf : Number(v);
    if (v === undefined || Number.isNaN(x) || (int && (!Number.isInteger(x) || x < 1))) {
      throw fail(`${flag} needs ${int ? 'a positive integer' : 'a number'}, got ${JSON.stringify(v)}`);
    }
    return x;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--threshold') opts.threshold = num(a, argv[++i], false);
    else if (a === '--batch-size') opts.batchSize = num(a, argv[++i], true);
    else if (a === '--threads') opts.threads = num(a, argv[++i], true);
    else if (a === '--no-range-check') opts.rangeCheck = false;
    else if (a === '--no-verify') opts.verify = false;
    else if (a === '--info') opts.info = true;
    else if (a === '-h' || a === '--help') { console.log(USAGE); process.exit(0); }
    else if (a.startsWith('--')) throw fail(`unknown option ${a}\n${USAGE}`);
    else opts.files.push(a);
  }
  if (!opts.files.length) throw fail(USAGE);
  if (!opts.info && opts.files.length < 2) throw fail(`no inputs given\n${USAGE}`);
  return opts;
}

function readFile(p, what) {
  let st;
  try { st = fs.statSync(p); } catch (e) { throw fail(`${p}: no such file`); }
  if (st.isDirectory()) throw fail(`${p} is a directory, expected a ${what}`);
  return fs.readFileSync(p);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const modelPath = opts.files[0];
  const bytes = readFile(modelPath, '.onnx file');
  const { info, verified } = await fmt.loadDetectorBytes(bytes, modelPath, opts.verify);
  if (opts.info) {
    console.log(JSON.stringify({ ...info, file: modelPath, size_bytes: bytes.length, verified }, null, 2));
    return;
  }
  const so = { graphOptimizationLevel: 'all', logSeverityLevel: 3 };
  if (opts.threads) { so.intraOpNumThreads = opts.threads; so.interOpNumThreads = 1; }
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, so);
  } catch (e) {
    throw fail(`${modelPath}: onnxruntime cannot load it (${String(e.message).split('\n')[0].slice(0, 300)}). The file is corrupt or not an ONNX model; re-export it.`);
  }
  const needOut = [fmt.OUT.logits, fmt.OUT.pred, fmt.OUT.score, fmt.OUT.isAnomaly, fmt.OUT.layerScores];
  const missing = needOut.filter((n) => !session.outputNames.includes(n));
  if (!session.inputNames.includes(info.input.name) || missing.length) {
    throw fail(`${modelPath}: graph inputs ${JSON.stringify(session.inputNames)} / outputs ${JSON.stringify(session.outputNames)} do not match its ufad metadata; re-export it.`);
  }
  const threshold = opts.threshold === null ? info.threshold : opts.threshold;
  // `threshold` is an optional graph input whose default (an initializer) is the calibrated
  // value. onnxruntime-node (1.30) accepts a feed for it but silently keeps the stored default,
  // so the verdict is taken from the `score` output with the format's rule instead
  // (fmt.records with applyThreshold), which is exact for any threshold.
  const fetch = [fmt.OUT.pred, fmt.OUT.score, fmt.OUT.isAnomaly, fmt.OUT.layerScores];
  const per = info.input.shape.slice(1).reduce((a, b) => a * b, 1);

  const lines = [];
  for (const file of opts.files.slice(1)) {
    if (path.extname(file).toLowerCase() !== '.npy') {
      throw fail(`${file}: unsupported file type ${JSON.stringify(path.extname(file))}; this client reads .npy (np.save(path, x.astype(np.float32)))`);
    }
    const arr = parseNpy(readFile(file, '.npy file'), file);
    const batch = fmt.asBatch(arr.data, arr.shape, arr.dtype, info.input, opts.rangeCheck);
    const n = batch.shape[0];
    for (let start = 0; start < n; start += opts.batchSize) {
      const b = Math.min(opts.batchSize, n - start);
      const chunk = batch.data.subarray(start * per, (start + b) * per);
      const feeds = {
        [info.input.name]: new ort.Tensor(fmt.tensorType(info.input), chunk, [b, ...batch.shape.slice(1)]),
      };
      const out = await session.run(feeds, fetch);
      for (const rec of fmt.records(out, info, threshold, chunk, start, true)) {
        rec.source = file;
        rec.provider = 'CPUExecutionProvider';
        lines.push(JSON.stringify(rec));
      }
    }
  }
  process.stdout.write(lines.length ? lines.join('\n') + '\n' : '');
}

main().catch((e) => {
  if (e && e.name === 'UfadError') {
    process.stderr.write(`error: ${e.message}\n`);
    process.exit(2);
  }
  process.stderr.write(`internal error (a bug, please report): ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
