/*
 * ufad file format for JavaScript (Node.js and browsers): read the `ufad.*` metadata of a
 * detector .onnx file, verify its graph sha256, check inputs, and turn the graph's outputs
 * into the records `ufad score --json` prints.
 *
 * Why a protobuf reader: onnxruntime-node and onnxruntime-web (1.30) expose input/output
 * names and shapes but not the model's custom metadata (no `custom_metadata_map` as in
 * Python), so the few top-level fields we need are read from the ModelProto bytes here:
 * field 7 = graph (hashed for the integrity check; its field 10, doc_string, names the format
 * version it was written as), field 14 = metadata_props (StringStringEntryProto: 1 = key,
 * 2 = value). Integrity follows FORMAT.md "Integrity" (the same rules as
 * ufad/runtime/integrity.py): `ufad.graph_sha256` covers the graph, `ufad.content_sha256`
 * every other top-level field and every metadata entry but itself and `ufad.signature`.
 *
 * Loads as CommonJS (`require('./ufad_format.js')`) or as a plain <script> (global
 * `ufadFormat`). No dependencies.
 */
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.ufadFormat = factory();
})(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  const FORMAT_VERSION = 2;
  const REQUIRED_KEYS = [
    'ufad.format_version', 'ufad.method', 'ufad.params', 'ufad.layers', 'ufad.classes',
    'ufad.input', 'ufad.outputs', 'ufad.threshold', 'ufad.calibration', 'ufad.graph_sha256',
  ];
  const REQUIRED_KEYS_V2 = REQUIRED_KEYS.concat(['ufad.content_sha256']);
  const CONTENT_DOMAIN = 'ufad-content-v2\n';
  const UNCOVERED = ['ufad.content_sha256', 'ufad.signature'];
  const GRAPH_MARKER = 'ufad.format_version=';
  const GRAPH_DOC_STRING = 10;
  const OUT = { logits: 'logits', pred: 'pred', score: 'score', isAnomaly: 'is_anomaly', layerScores: 'layer_scores' };
  const GRAPH_FIELD = 7;
  const METADATA_FIELD = 14;

  /** A user-facing error: the message says what is wrong and what to do. */
  class UfadError extends Error {
    constructor(message) { super(message); this.name = 'UfadError'; }
  }

  function readVarint(buf, pos) {
    // Numbers, not BigInt: every length in a < 2 GB file fits in 2^53.
    let result = 0, mul = 1;
    for (let i = 0; i < 10; i++) {
      if (pos >= buf.length) throw new Error('truncated varint');
      const b = buf[pos++];
      result += (b & 0x7f) * mul;
      if (!(b & 0x80)) return [result, pos];
      mul *= 128;
    }
    throw new Error('varint too long');
  }

  /**
   * Walk one protobuf message; call visit(fieldNumber, wireType, payload|null, record) per
   * field, where record is the field's whole bytes (tag included).
   */
  function walk(buf, visit) {
    let pos = 0;
    while (pos < buf.length) {
      const start = pos;
      let key;
      [key, pos] = readVarint(buf, pos);
      const field = Math.floor(key / 8), wire = key & 7;
      if (field === 0) throw new Error('field number 0');
      let payload = null;
      if (wire === 0) {
        [, pos] = readVarint(buf, pos);
      } else if (wire === 1) {
        pos += 8;
      } else if (wire === 2) {
        let len;
        [len, pos] = readVarint(buf, pos);
        if (pos + len > buf.length) throw new Error('truncated length-delimited field');
        payload = buf.subarray(pos, pos + len);
        pos += len;
      } else if (wire === 5) {
        pos += 4;
      } else {
        throw new Error(`unsupported wire type ${wire}`);
      }
      if (pos > buf.length) throw new Error('truncated message');
      visit(field, wire, payload, buf.subarray(start, pos));
    }
  }

  /**
   * Read metadata_props, the raw graph bytes and the other top-level records of a serialized
   * ModelProto. Refuses two graphs and a metadata key that appears twice (protobuf readers
   * would merge or pick one, so what is verified could differ from what runs).
   * @param {Uint8Array} bytes the whole .onnx file
   * @returns {{metadata: Object<string,string>, graph: Uint8Array, header: Uint8Array[]}}
   */
  function readModelProto(bytes, path) {
    const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
    const utf8 = new TextDecoder('utf-8', { fatal: true });
    const metadata = {};
    const graphs = [], header = [];
    let duplicate = null;
    try {
      walk(buf, (field, wire, data, record) => {
        if (field === GRAPH_FIELD && wire === 2) graphs.push(data);
        else if (field === METADATA_FIELD && wire === 2) {
          let k = '', v = '';
          walk(data, (f, w, d) => {
            if (w !== 2) return;
            if (f === 1) k = utf8.decode(d);
            else if (f === 2) v = utf8.decode(d);
          });
          if (Object.prototype.hasOwnProperty.call(metadata, k)) duplicate = k;
          metadata[k] = v;
        } else if (field !== METADATA_FIELD && field !== GRAPH_FIELD) header.push(record);
      });
    } catch (e) {
      throw new UfadError(`${path}: not a well-formed ONNX model (${e.message}); it may be truncated or corrupt. Re-export it or copy it again.`);
    }
    if (graphs.length !== 1) throw new UfadError(`${path}: not a well-formed ONNX model (${graphs.length ? graphs.length + ' graphs' : 'no graph'}); it may be truncated or corrupt. Re-export it or copy it again.`);
    if (duplicate !== null) throw new UfadError(`${path}: metadata key '${duplicate}' appears twice; readers would disagree on its value, so the file was edited. Do not trust it; re-export it.`);
    return { metadata, graph: graphs[0], header };
  }

  /** The format version the graph says it was written as (its doc_string marker), 0 if none. */
  function graphMarkerVersion(graph) {
    let doc = '';
    walk(graph, (field, wire, data) => {
      if (field === GRAPH_DOC_STRING && wire === 2) doc = new TextDecoder('utf-8').decode(data);
    });
    for (const part of doc.split(/\s+/)) {
      if (part.startsWith(GRAPH_MARKER)) {
        const v = Number(part.slice(GRAPH_MARKER.length));
        return Number.isInteger(v) ? v : 0;
      }
    }
    return 0;
  }

  /** The bytes `ufad.content_sha256` is the sha256 of (FORMAT.md, "Integrity"). */
  function contentBytes(header, metadata) {
    const enc = new TextEncoder();
    const netstring = (s) => { const b = enc.encode(s); return [enc.encode(`${b.length}:`), b, enc.encode(',')]; };
    const cmp = (a, b) => {  // sort by UTF-8 bytes, as the Python runtime does
      const x = enc.encode(a), y = enc.encode(b);
      for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i] - y[i];
      return x.length - y.length;
    };
    const parts = [enc.encode(CONTENT_DOMAIN), ...header];
    for (const k of Object.keys(metadata).filter((k) => !UNCOVERED.includes(k)).sort(cmp)) {
      parts.push(...netstring(k), ...netstring(metadata[k]));
    }
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let pos = 0;
    for (const p of parts) { out.set(p, pos); pos += p.length; }
    return out;
  }

  function json(meta, key, path) {
    try { return JSON.parse(meta[key]); } catch (e) {
      throw new UfadError(`${path}: metadata '${key}' is not valid JSON (${e.message}); the file was edited or is corrupt. Re-export it with \`ufad export\`.`);
    }
  }

  /**
   * Validate and parse the ufad.* metadata (same rules as ufad/runtime/format.py).
   * @returns {{format_version:number, method:string, params:Object, layers:Array, classes:string[],
   *   input:{name:string, shape:(number|null)[], dtype:string, range:number[]|null},
   *   outputs:Object, threshold:number, calibration:Object, graph_sha256:string, producer:Object,
   *   layer_names:string[]}}
   */
  function parseMetadata(meta, path = '<model>') {
    if (!('ufad.format_version' in meta)) {
      throw new UfadError(`${path} is an ONNX model but not a ufad detector (no 'ufad.format_version' metadata). Export one with \`ufad export MODEL --data DATASET -o OUT.onnx\`.`);
    }
    const version = Number(meta['ufad.format_version']);
    if (!Number.isInteger(version) || version < 1) throw new UfadError(`${path}: invalid ufad format version ${JSON.stringify(meta['ufad.format_version'])}.`);
    if (version > FORMAT_VERSION) {
      throw new UfadError(`${path} uses ufad format version ${version}, newer than this client understands (<= ${FORMAT_VERSION}). Update the client.`);
    }
    const missing = (version >= 2 ? REQUIRED_KEYS_V2 : REQUIRED_KEYS).filter((k) => !(k in meta));
    if (missing.length) throw new UfadError(`${path}: ufad metadata is incomplete, missing ${JSON.stringify(missing)}. Re-export the detector.`);
    const threshold = Number(meta['ufad.threshold']);
    const inp = json(meta, 'ufad.input', path);
    const outputs = json(meta, 'ufad.outputs', path);
    const layers = json(meta, 'ufad.layers', path);
    if (!inp || typeof inp.name !== 'string' || !Array.isArray(inp.shape) || !Array.isArray(layers) || Number.isNaN(threshold)) {
      throw new UfadError(`${path}: ufad metadata is malformed (input / layers / threshold). Re-export the detector.`);
    }
    const ls = outputs && outputs[OUT.layerScores];
    const layer_names = ls && Array.isArray(ls.columns) ? ls.columns.map(String) : layers.map((l) => String(l.name));
    return {
      format_version: version,
      method: meta['ufad.method'],
      params: json(meta, 'ufad.params', path),
      layers: layers.map((l) => ({ name: String(l.name), dim: Number(l.dim), reduction: String(l.reduction), output: String(l.output) })),
      classes: json(meta, 'ufad.classes', path).map(String),
      input: {
        name: inp.name,
        shape: inp.shape.map((d) => (d === null ? null : Number(d))),
        dtype: String(inp.dtype),
        range: inp.range ? [Number(inp.range[0]), Number(inp.range[1])] : null,
        range_policy: inp.range_policy === undefined ? 'refuse' : String(inp.range_policy),
      },
      outputs,
      threshold,
      calibration: json(meta, 'ufad.calibration', path),
      graph_sha256: meta['ufad.graph_sha256'],
      content_sha256: meta['ufad.content_sha256'] || '',
      signed: 'ufad.signature' in meta,
      producer: 'ufad.producer' in meta ? json(meta, 'ufad.producer', path) : {},
      layer_names,
    };
  }

  async function sha256Hex(bytes) {
    const c = globalThis.crypto;
    if (!c || !c.subtle) return null;  // e.g. a browser page served over plain http from a non-localhost host
    const digest = await c.subtle.digest('SHA-256', bytes);
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');
  }

  /**
   * Read a detector file's bytes: parse its metadata and (verify=true) check the digests as
   * the Python runtime does: the graph against `ufad.graph_sha256`, the graph's format marker
   * against the metadata's version, and (format 2) header + metadata against
   * `ufad.content_sha256`. A format-1 file loads with one warning (its metadata is not covered).
   * @returns {Promise<{info: Object, metadata: Object, verified: boolean}>}
   */
  async function loadDetectorBytes(bytes, path = '<model>', verify = true) {
    const { metadata, graph, header } = readModelProto(bytes, path);
    if (!('ufad.format_version' in metadata)) parseMetadata(metadata, path);  // "not a ufad detector"
    let verified = false;
    if (verify) {
      const actual = await sha256Hex(graph);
      if (actual !== null) {
        const recorded = String(metadata['ufad.graph_sha256'] || '');
        if (actual !== recorded) {
          throw new UfadError(`${path}: the graph's sha256 (${actual.slice(0, 16)}...) does not match the one recorded in its metadata (${recorded.slice(0, 16)}...): the weights or statistics were modified after export. Do not trust this file; re-export it.`);
        }
        const version = Number(metadata['ufad.format_version']);
        const written = graphMarkerVersion(graph);
        if (written > version) {
          throw new UfadError(`${path}: its metadata says ufad format version ${version} but the graph was written as version ${written}: the metadata was edited to skip the newer integrity check. Do not trust this file; re-export it.`);
        }
        if (version >= 2) {
          const content = await sha256Hex(contentBytes(header, metadata));
          const want = String(metadata['ufad.content_sha256'] || '');
          if (content !== want) {
            throw new UfadError(`${path}: the file's content sha256 (${content.slice(0, 16)}...) does not match the one recorded in its metadata (${want.slice(0, 16)}...): its metadata (threshold, classes, input spec, ...) or model header was edited after export. Do not trust this file; re-export it.`);
          }
        } else {
          console.warn(`warning: ${path} uses ufad format version 1: its metadata (threshold, classes, input spec) is not covered by the integrity check, only its graph. Re-export it to protect the metadata too.`);
        }
        verified = true;
      }
    }
    const info = parseMetadata(metadata, path);
    return { info, metadata, verified };
  }

  function describeSpec(spec) {
    const dims = spec.shape.map((d) => (d === null ? 'B' : String(d))).join(', ');
    const rng = spec.range ? ` with values in [${spec.range[0]}, ${spec.range[1]}]` : '';
    return `${spec.dtype} [${dims}]${rng}`;
  }

  /**
   * Turn an array (typed array + shape + numpy-like dtype) into a float32 batch for the
   * detector, following ufad/runtime/inputs.py: float64 -> float32, uint8 / 255 when the
   * model's range lies in [0, 1]; a single sample gets a batch axis, [B, H, W] gets the
   * channel axis for one-channel models; values far outside the recorded range are refused
   * (range policy "refuse") unless rangeCheck is false; with policy "flag" they pass and the
   * graph flags them. NaN / Inf pass (the graph scores them +inf).
   * @returns {{data: Float32Array, shape: number[]}}
   */
  function asBatch(data, shape, dtype, spec, rangeCheck = true) {
    const expected = describeSpec(spec);
    if (spec.dtype === 'int64') return idBatch(data, shape, dtype, spec, rangeCheck, expected);
    if (spec.dtype !== 'float32') throw new UfadError(`this client cannot feed ${expected}; upgrade it`);
    let arr;
    if (dtype === 'float32') arr = data instanceof Float32Array ? data : Float32Array.from(data);
    else if (dtype === 'float64' || dtype === 'float16') arr = Float32Array.from(data);
    else if (dtype === 'uint8') {
      const [lo, hi] = spec.range || [0, 1];
      if (lo < -1e-6 || hi > 1 + 1e-6) {
        throw new UfadError(`got uint8 data but the model's input range is [${lo}, ${hi}], so the scaling is ambiguous; convert to float32 yourself. Expected ${expected}.`);
      }
      arr = new Float32Array(data.length);
      for (let i = 0; i < data.length; i++) arr[i] = Math.fround(data[i] / 255);
    } else {
      throw new UfadError(`unsupported dtype ${dtype}; expected ${expected} (float64 is cast, uint8 images are divided by 255).`);
    }
    const sample = spec.shape.slice(1);
    let s = shape.slice();
    const eq = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);
    if (eq(s, sample)) s = [1, ...s];
    else if (sample.length === 3 && sample[0] === 1 && s.length === 3 && eq(s.slice(1), sample.slice(1))) s = [s[0], 1, s[1], s[2]];
    else if (sample.length === 3 && sample[0] === 1 && eq(s, sample.slice(1))) s = [1, 1, ...s];
    if (s.length !== spec.shape.length || !eq(s.slice(1), sample)) {
      throw new UfadError(`input has shape [${shape.join(', ')}], expected ${expected}`);
    }
    if (rangeCheck && spec.range && arr.length) {
      const [lo, hi] = spec.range;
      const width = Math.max(hi - lo, 1e-6);
      // Read float values before the float32 cast, so a float64 1e300 is refused, not made inf.
      const vals = dtype === 'uint8' ? arr : data;
      let amin = Infinity, amax = -Infinity;
      for (let i = 0; i < vals.length; i++) {
        const v = vals[i];
        if (Number.isFinite(v)) { if (v < amin) amin = v; if (v > amax) amax = v; }
      }
      if (amin === Infinity) { amin = lo; amax = hi; }
      if (spec.range_policy !== 'flag' && (amin < lo - width || amax > hi + width)) {
        const hint = amax > 2 && amax <= 256 && hi <= 1 + 1e-6 ? ' (looks like 0..255 pixels: divide by 255)' : '';
        throw new UfadError(`input values span [${amin}, ${amax}], far outside the model's range [${lo}, ${hi}]${hint}. Rescale the input, or pass --no-range-check to score it anyway.`);
      }
    }
    return { data: arr, shape: s };
  }

  /**
   * asBatch for a detector that reads ids (ufad.input.dtype int64, FORMAT.md): integer data as
   * a BigInt64Array; floats are refused, not rounded. Ids outside the range seen at fit are
   * refused under policy "refuse"; under "flag" they pass and the graph flags them.
   */
  function idBatch(data, shape, dtype, spec, rangeCheck, expected) {
    if (!['int64', 'int32', 'uint8'].includes(dtype)) {
      throw new UfadError(`got ${dtype} data but this model reads integer ids; expected ${expected}. Save the ids as integers (x.astype(numpy.int64)).`);
    }
    const arr = data instanceof BigInt64Array ? data : BigInt64Array.from(data, (v) => BigInt(v));
    const sample = spec.shape.slice(1);
    const s = shape.length === sample.length ? [1, ...shape] : shape.slice();
    if (s.length !== spec.shape.length || s.slice(1).some((d, i) => d !== sample[i])) {
      throw new UfadError(`input has shape [${shape.join(', ')}], expected ${expected}`);
    }
    if (rangeCheck && spec.range && spec.range_policy !== 'flag') {
      const [lo, hi] = spec.range;
      for (const v of arr) {
        if (v < lo || v > hi) {
          throw new UfadError(`input id ${v} is beyond the ids seen at fit [${lo}, ${hi}]; map unknown ids to a known one, or pass --no-range-check to score them anyway.`);
        }
      }
    }
    return { data: arr, shape: s };
  }

  /** The ort.Tensor type of the detector's input. */
  function tensorType(spec) {
    return spec.dtype === 'int64' ? 'int64' : 'float32';
  }

  /** The format's verdict rule: NaN scores (never produced by the graph) count as anomalous. */
  function isAnomaly(score, threshold) {
    return !(score <= threshold);
  }

  function scoreValue(s) {
    // Same spelling as the Python runtime's JSON for scores: non-finite values become strings
    // (JSON has no inf / nan; Python would write bare Infinity / NaN tokens).
    if (Number.isFinite(s)) return s;
    if (Number.isNaN(s)) return 'nan';
    return s > 0 ? 'inf' : '-inf';
  }

  /**
   * One record per input, the `ufad score --json` schema:
   * index, pred, label, score, is_anomaly, threshold, layer_scores, nonfinite_input,
   * out_of_range_input (range policy "flag": the graph scored the input +inf).
   * @param {Object} out onnxruntime outputs (tensors with .data) for one batch
   * @param {Float32Array} input the batch that was scored (for nonfinite_input)
   * @param {number} offset index of the first row of this batch
   * @param {boolean} applyThreshold take the verdict from `score` with `threshold` (the format's
   *   rule) instead of the graph's `is_anomaly`; needed whenever `threshold` differs from the
   *   file's calibrated one, since onnxruntime-node and -web do not apply a fed `threshold`.
   */
  function records(out, info, threshold, input, offset = 0, applyThreshold = false) {
    const pred = out[OUT.pred].data, score = out[OUT.score].data;
    const isAnom = out[OUT.isAnomaly].data, ls = out[OUT.layerScores].data;
    const n = score.length, L = info.layer_names.length;
    const per = n ? input.length / n : 0;
    const rng = info.input.range, flag = info.input.range_policy === 'flag' && rng;
    const ids = info.input.dtype === 'int64';   // ids: the range is exact, and there is no NaN
    const width = rng && !ids ? Math.max(rng[1] - rng[0], 1e-6) : 0;
    const low = rng ? Math.fround(rng[0] - width) : 0, high = rng ? Math.fround(rng[1] + width) : 0;
    const rows = [];
    for (let i = 0; i < n; i++) {
      const p = Number(pred[i]);  // int64 comes back as BigInt
      const layerScores = {};
      for (let j = 0; j < L; j++) layerScores[info.layer_names[j]] = scoreValue(ls[i * L + j]);
      let nonfinite = false;
      let outOfRange = false;
      for (let k = i * per; k < (i + 1) * per; k++) {
        if (!ids && !Number.isFinite(input[k])) nonfinite = true;
        else if (flag && (input[k] < low || input[k] > high)) outOfRange = true;
      }
      rows.push({
        index: offset + i,
        pred: p,
        label: p >= 0 && p < info.classes.length ? info.classes[p] : String(p),
        score: scoreValue(score[i]),
        // Non-finite inputs (and a NaN score) are anomalous whatever the threshold, as in the
        // Python runtime: a threshold of +inf must not let a NaN image through.
        is_anomaly: (applyThreshold ? isAnomaly(score[i], threshold) : Boolean(isAnom[i])) || nonfinite || Number.isNaN(score[i]),
        threshold: scoreValue(threshold),
        layer_scores: layerScores,
        nonfinite_input: nonfinite,
        out_of_range_input: Boolean(outOfRange),
      });
    }
    return rows;
  }

  return { FORMAT_VERSION, OUT, UfadError, isAnomaly, readModelProto, parseMetadata, loadDetectorBytes, sha256Hex, asBatch, tensorType, records, describeSpec };
});
