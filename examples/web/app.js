/*
 * ufad web demo: draw / drop / noise -> onnxruntime-web (WASM) -> prediction + anomaly verdict.
 * Needs the globals `ort` (onnxruntime-web) and `ufadFormat` (../node/ufad_format.js).
 * State for scripts and tests: window.ufadState = {ready, error, info, verified, last}.
 */
'use strict';

(function () {
  const F = window.ufadFormat;
  const $ = (id) => document.getElementById(id);
  const state = { ready: false, error: null, info: null, verified: false, last: null, count: 0 };
  window.ufadState = state;
  let session = null;
  let threshold = null;
  let lastInput = null;     // {x: Float32Array, source}
  let padMode = 'draw';     // 'draw' | 'image': the next stroke clears a shown image first
  let noiseSeed = 1;

  // Single-threaded WASM: needs no cross-origin isolation headers, and a 4 MB CNN is fast anyway.
  ort.env.wasm.numThreads = 1;
  ort.env.logLevel = 'error';  // ORT warns that the optional threshold is an overridable initializer: by design
  ort.env.wasm.wasmPaths = new URL('ort/', location.href).href;

  const pad = $('pad');
  const padCtx = pad.getContext('2d', { willReadFrequently: true });
  const seen = $('seen');
  const seenCtx = seen.getContext('2d', { willReadFrequently: true });

  function setStatus(msg, isError = false) {
    $('status').textContent = msg;
    $('status').className = 'info' + (isError ? ' error' : '');
  }

  function dims() {
    const s = state.info.input.shape;
    return { H: s[2], W: s[3] };
  }

  function range() {
    return state.info.input.range || [0, 1];
  }

  function clearPad() {
    padCtx.fillStyle = '#000';
    padCtx.fillRect(0, 0, pad.width, pad.height);
    padMode = 'draw';
  }

  async function loadModel(bytes, name) {
    state.ready = false;
    setStatus(`loading ${name}…`);
    const { info, verified } = await F.loadDetectorBytes(bytes, name, true);
    const s = info.input.shape;
    if (info.input.dtype !== 'float32' || s.length !== 4 || s[1] !== 1) {
      throw new F.UfadError(`${name}: this page handles one-channel image models, float32 [B, 1, H, W]; this one takes ${info.input.dtype} [${s.join(', ')}]`);
    }
    const sess = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
    if (!sess.inputNames.includes(info.input.name) || !sess.outputNames.includes(F.OUT.score)) {
      throw new F.UfadError(`${name}: graph inputs/outputs do not match its ufad metadata; re-export it`);
    }
    if (session) await session.release();
    session = sess;
    state.info = info;
    state.verified = verified;
    threshold = info.threshold;
    $('thr').value = String(Number(threshold.toFixed(4)));
    const cal = info.calibration || {};
    $('info').textContent = `${name}: method ${info.method}, ${info.classes.length} classes, layers ${info.layer_names.join(', ')}; ` +
      `threshold ${threshold.toPrecision(5)} (accepts ${Math.round((cal.target_tpr || 0) * 100)}% of held-out in-distribution data); ` +
      `graph sha256 ${verified ? 'verified' : 'NOT verified (no WebCrypto on this origin)'}; onnxruntime-web ${ort.env.versions ? ort.env.versions.web : ''} wasm`;
    state.ready = true;
    setStatus('ready: draw a digit, drop an image, or press Noise');
    if (lastInput) await score(lastInput.x, lastInput.source);
  }

  function softmax(logits) {
    const m = Math.max(...logits);
    const e = logits.map((v) => Math.exp(v - m));
    const s = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / s);
  }

  function showSeen(x) {
    const { H, W } = dims();
    const [lo, hi] = range();
    const img = seenCtx.createImageData(W, H);
    for (let i = 0; i < H * W; i++) {
      const v = Math.max(0, Math.min(255, Math.round(((x[i] - lo) / (hi - lo || 1)) * 255)));
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 255;
    }
    seen.width = W; seen.height = H;
    seenCtx.putImageData(img, 0, 0);
  }

  function fmt(v) {
    return typeof v === 'string' ? v : (Math.abs(v) >= 1000 ? v.toExponential(2) : v.toFixed(3));
  }

  function render(rec, probs) {
    $('pred').textContent = rec.label;
    $('conf').textContent = `classifier confidence ${(probs[rec.pred] * 100).toFixed(1)}%`;
    const v = $('verdict');
    v.dataset.anomaly = String(rec.is_anomaly);
    v.textContent = rec.is_anomaly
      ? 'ANOMALY: do not trust this prediction'
      : 'OK: looks like the data the model knows';
    $('score').textContent = fmt(rec.score);
    // Bar scale: from the 1% quantile of in-distribution scores to as far above the threshold.
    const q = (state.info.calibration || {}).id_score_quantiles || {};
    const lo = Number.isFinite(q['0.01']) ? q['0.01'] : threshold - 3;
    const hi = threshold + (threshold - lo);
    const pos = (s) => Math.max(0, Math.min(100, ((s - lo) / (hi - lo)) * 100));
    const bar = $('bar');
    bar.style.setProperty('--thr', `${pos(threshold)}%`);
    bar.style.setProperty('--pos', `${typeof rec.score === 'string' ? 100 : pos(rec.score)}%`);
    $('dot').hidden = false;
    const rows = Object.entries(rec.layer_scores).map(([name, s]) =>
      `<tr><td>layer <b>${name}</b></td><td class="num">${fmt(s)}</td><td>${s > threshold ? '⚠ above threshold' : ''}</td></tr>`);
    $('layers').innerHTML = rows.join('');
  }

  /** Score one [H*W] float32 image in the model's value range. */
  async function score(x, source) {
    if (!state.ready) return;
    const { H, W } = dims();
    const feeds = { [state.info.input.name]: new ort.Tensor('float32', x, [1, 1, H, W]) };
    // onnxruntime-web (1.30) refuses to feed an input that has an initializer (ufad's optional
    // `threshold`), so the graph's verdict always uses the calibrated threshold. For another
    // threshold the page applies the format's rule is_anomaly = not (score <= threshold).
    const canFeed = session.inputNames.includes('threshold');
    if (canFeed) feeds.threshold = new ort.Tensor('float32', Float32Array.of(threshold), []);
    const out = await session.run(feeds);
    const rec = F.records(out, state.info, threshold, x, 0, !canFeed && threshold !== state.info.threshold)[0];
    const probs = softmax(Array.from(out[F.OUT.logits].data));
    lastInput = { x, source };
    showSeen(x);
    render(rec, probs);
    state.count += 1;
    state.last = { ...rec, source, confidence: probs[rec.pred], input: Array.from(x), seq: state.count };
  }

  /** Gray 0..255 values of a canvas region (PIL's ITU-R 601-2 luma, as `ufad score img.png`). */
  function gray(ctx, w, h) {
    const d = ctx.getImageData(0, 0, w, h).data;
    const g = new Float32Array(w * h);
    for (let i = 0; i < w * h; i++) {
      g[i] = (d[4 * i] * 19595 + d[4 * i + 1] * 38470 + d[4 * i + 2] * 7471 + 0x8000) >> 16;
    }
    return g;
  }

  function toRange(g255) {
    const [lo, hi] = range();
    const x = new Float32Array(g255.length);
    for (let i = 0; i < g255.length; i++) x[i] = lo + (g255[i] / 255) * (hi - lo);
    return x;
  }

  function canvas(w, h) {
    const c = document.createElement('canvas');
    c.width = w; c.height = h;
    const ctx = c.getContext('2d', { willReadFrequently: true });
    ctx.fillStyle = '#000';
    ctx.fillRect(0, 0, w, h);
    return [c, ctx];
  }

  /**
   * MNIST-style preprocessing of a drawing: crop to the ink, fit it in a 20x20 box keeping its
   * aspect ratio, then shift so its centre of mass sits in the middle of the 28x28 field.
   */
  function fromDrawing() {
    const { H, W } = dims();
    const n = pad.width;
    const g = gray(padCtx, n, n);
    let x0 = n, y0 = n, x1 = -1, y1 = -1;
    for (let y = 0; y < n; y++) for (let x = 0; x < n; x++) {
      if (g[y * n + x] > 30) { if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y; }
    }
    if (x1 < 0) return null;
    const bw = x1 - x0 + 1, bh = y1 - y0 + 1;
    const box = Math.round(Math.min(H, W) * 20 / 28);
    const s = box / Math.max(bw, bh);
    const tw = Math.max(1, Math.round(bw * s)), th = Math.max(1, Math.round(bh * s));
    const [c1, ctx1] = canvas(W, H);
    ctx1.imageSmoothingQuality = 'high';
    ctx1.drawImage(pad, x0, y0, bw, bh, Math.floor((W - tw) / 2), Math.floor((H - th) / 2), tw, th);
    const g1 = gray(ctx1, W, H);
    let m = 0, cx = 0, cy = 0;
    for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) { const v = g1[y * W + x]; m += v; cx += v * x; cy += v * y; }
    const dx = Math.round((W - 1) / 2 - cx / m), dy = Math.round((H - 1) / 2 - cy / m);
    const [, ctx2] = canvas(W, H);
    ctx2.drawImage(c1, dx, dy);
    return toRange(gray(ctx2, W, H));
  }

  function showOnPad(x) {
    const { H, W } = dims();
    const [c, ctx] = canvas(W, H);
    const [lo, hi] = range();
    const img = ctx.createImageData(W, H);
    for (let i = 0; i < H * W; i++) {
      const v = Number.isFinite(x[i]) ? Math.round(((x[i] - lo) / (hi - lo || 1)) * 255) : 255;
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    padCtx.imageSmoothingEnabled = false;
    padCtx.drawImage(c, 0, 0, pad.width, pad.height);
    padCtx.imageSmoothingEnabled = true;
    padMode = 'image';
  }

  async function fromImageFile(file) {
    const { H, W } = dims();
    // No colour management or premultiplication, so an 8-bit gray PNG reads back exactly.
    const bmp = await createImageBitmap(file, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
    const [, ctx] = canvas(W, H);
    ctx.imageSmoothingQuality = 'high';
    ctx.drawImage(bmp, 0, 0, W, H);
    let g = gray(ctx, W, H);
    if ($('invert').checked) g = g.map((v) => 255 - v);
    return toRange(g);
  }

  /** Uniform noise over the model's value range; a new seeded image on every press. */
  function noiseImage() {
    const { H, W } = dims();
    const [lo, hi] = range();
    let a = (noiseSeed++ * 0x9e3779b9) >>> 0;
    const rand = () => {  // mulberry32
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const x = new Float32Array(H * W);
    for (let i = 0; i < x.length; i++) x[i] = lo + rand() * (hi - lo);
    return x;
  }

  function fail(e) {
    console.error(e);
    state.error = String(e && e.message ? e.message : e);
    setStatus(`error: ${state.error}`, true);
  }

  async function handleFile(file) {
    try {
      if (/\.onnx$/i.test(file.name)) {
        await loadModel(new Uint8Array(await file.arrayBuffer()), file.name);
        return;
      }
      if (!state.ready) return;
      const x = await fromImageFile(file);
      showOnPad(x);
      await score(x, `file:${file.name}`);
    } catch (e) { fail(e); }
  }

  // Drawing with pointer events (mouse, pen, touch).
  let drawing = false;
  function pt(ev) {
    const r = pad.getBoundingClientRect();
    return [(ev.clientX - r.left) * (pad.width / r.width), (ev.clientY - r.top) * (pad.height / r.height)];
  }
  pad.addEventListener('pointerdown', (ev) => {
    if (padMode === 'image') clearPad();
    drawing = true;
    pad.setPointerCapture(ev.pointerId);
    const [x, y] = pt(ev);
    padCtx.strokeStyle = '#fff';
    padCtx.lineWidth = 20;
    padCtx.lineCap = 'round';
    padCtx.lineJoin = 'round';
    padCtx.beginPath();
    padCtx.moveTo(x, y);
    padCtx.lineTo(x + 0.01, y);
    padCtx.stroke();
  });
  pad.addEventListener('pointermove', (ev) => {
    if (!drawing) return;
    const [x, y] = pt(ev);
    padCtx.lineTo(x, y);
    padCtx.stroke();
  });
  const endStroke = async () => {
    if (!drawing) return;
    drawing = false;
    try {
      const x = state.ready && fromDrawing();
      if (x) await score(x, 'drawing');
    } catch (e) { fail(e); }
  };
  pad.addEventListener('pointerup', endStroke);
  pad.addEventListener('pointercancel', endStroke);

  pad.addEventListener('dragover', (ev) => { ev.preventDefault(); pad.classList.add('drop'); });
  pad.addEventListener('dragleave', () => pad.classList.remove('drop'));
  pad.addEventListener('drop', (ev) => {
    ev.preventDefault();
    pad.classList.remove('drop');
    const f = ev.dataTransfer.files[0];
    if (f) handleFile(f);
  });
  $('file').addEventListener('change', (ev) => {
    const f = ev.target.files[0];
    ev.target.value = '';
    if (f) handleFile(f);
  });
  $('clear').addEventListener('click', () => {
    clearPad();
    seenCtx.clearRect(0, 0, seen.width, seen.height);
    lastInput = null;
    $('pred').textContent = '–';
    $('conf').textContent = 'draw something';
    $('verdict').dataset.anomaly = '';
    $('verdict').textContent = 'no input yet';
    $('score').textContent = '–';
    $('dot').hidden = true;
    $('layers').innerHTML = '';
  });
  $('noise').addEventListener('click', async () => {
    if (!state.ready) return;
    try {
      const x = noiseImage();
      showOnPad(x);
      await score(x, `noise:${noiseSeed - 1}`);
    } catch (e) { fail(e); }
  });
  $('thr').addEventListener('change', async () => {
    const t = Number($('thr').value);
    if (!Number.isFinite(t)) { $('thr').value = String(threshold); return; }
    threshold = t;
    try { if (lastInput) await score(lastInput.x, lastInput.source); } catch (e) { fail(e); }
  });

  clearPad();
  fetch('model.onnx')
    .then(async (r) => {
      if (!r.ok) throw new Error(await r.text());
      return loadModel(new Uint8Array(await r.arrayBuffer()), 'model.onnx');
    })
    .catch(fail);
})();
