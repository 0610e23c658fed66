#!/usr/bin/env node
/*
 * Tiny static server for the ufad web demo (no dependencies, no CDN, nothing leaves the machine).
 *
 *   node serve.js --model detector.onnx [--port 8000] [--host 127.0.0.1]
 *
 * Serves index.html / app.js, the shared format reader (../node/ufad_format.js) at
 * lib/ufad_format.js, onnxruntime-web's js/wasm files from node_modules at ort/, and the
 * detector at model.onnx. Prints "ufad web demo: http://HOST:PORT/" once listening
 * (--port 0 picks a free port). Inference runs in the browser (WASM); the server only
 * hands out files.
 */
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');

const HERE = __dirname;
const ORT_DIST = path.join(HERE, 'node_modules', 'onnxruntime-web', 'dist');
const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8', '.wasm': 'application/wasm', '.css': 'text/css',
  '.onnx': 'application/octet-stream', '.map': 'application/json', '.png': 'image/png',
};

function parseArgs(argv) {
  const o = { model: process.env.UFAD_MODEL || null, port: 8000, host: '127.0.0.1' };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--model') o.model = argv[++i];
    else if (argv[i] === '--port') o.port = Number(argv[++i]);
    else if (argv[i] === '--host') o.host = argv[++i];
    else { console.error(`usage: node serve.js --model detector.onnx [--port N] [--host H]`); process.exit(2); }
  }
  if (o.model && !fs.existsSync(o.model)) { console.error(`error: ${o.model}: no such file`); process.exit(2); }
  if (!fs.existsSync(ORT_DIST)) {
    console.error('error: onnxruntime-web is not installed; run `npm ci` in examples/web (or tools/setup_js.sh)');
    process.exit(2);
  }
  return o;
}

/** Map a URL path to a file, or null: a fixed whitelist, so nothing else on disk is reachable. */
function resolve(urlPath, model) {
  if (urlPath === '/' || urlPath === '/index.html') return path.join(HERE, 'index.html');
  if (urlPath === '/app.js') return path.join(HERE, 'app.js');
  if (urlPath === '/lib/ufad_format.js') return path.join(HERE, '..', 'node', 'ufad_format.js');
  if (urlPath === '/model.onnx') return model;
  const m = /^\/ort\/([A-Za-z0-9._-]+)$/.exec(urlPath);
  if (m && !m[1].startsWith('.')) return path.join(ORT_DIST, m[1]);
  return null;
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  const server = http.createServer((req, res) => {
    const urlPath = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const file = resolve(urlPath, opts.model);
    if (!file || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      res.end(urlPath === '/model.onnx' ? 'no model: start serve.js with --model detector.onnx, or drop a .onnx file on the page' : 'not found');
      return;
    }
    res.writeHead(200, {
      'Content-Type': TYPES[path.extname(file)] || 'application/octet-stream',
      'Cache-Control': 'no-cache',
    });
    fs.createReadStream(file).pipe(res);
  });
  server.listen(opts.port, opts.host, () => {
    const { port } = server.address();
    console.log(`ufad web demo: http://${opts.host}:${port}/`);
  });
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main();
