#!/usr/bin/env node
/*
 * Drive the demo page in headless Chromium (playwright-core + the system browser):
 * load an image through the file input, draw a stroke, press Noise, and print what the
 * page shows as one JSON object. Used by tests/test_web.py; handy by hand too:
 *
 *   node e2e.js --url http://127.0.0.1:8000/ --image digit.png --shots OUTDIR
 *
 * Chromium: $CHROMIUM or /usr/bin/chromium (Debian package `chromium`).
 */
'use strict';

const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

function args(argv) {
  const o = { url: null, image: null, shots: null, timeout: 30000 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i].replace(/^--/, '');
    o[k] = argv[++i];
  }
  if (!o.url || !o.image) {
    console.error('usage: node e2e.js --url URL --image IMAGE.png [--shots DIR]');
    process.exit(2);
  }
  o.timeout = Number(o.timeout);
  return o;
}

async function main() {
  const o = args(process.argv.slice(2));
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  const browser = await chromium.launch({ executablePath, headless: true, args: ['--headless', '--no-sandbox'] });
  const logs = [];
  try {
    const page = await browser.newPage({ viewport: { width: 940, height: 560 }, deviceScaleFactor: 1 });
    page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
    await page.goto(o.url);
    await page.waitForFunction(() => window.ufadState && (window.ufadState.ready || window.ufadState.error), null, { timeout: o.timeout });
    const boot = await page.evaluate(() => ({ ready: window.ufadState.ready, error: window.ufadState.error, verified: window.ufadState.verified }));
    if (!boot.ready) throw new Error(`page did not load the model: ${boot.error}`);

    const after = async (n) => {
      await page.waitForFunction((k) => window.ufadState.count >= k || window.ufadState.error, n, { timeout: o.timeout });
      return page.evaluate(() => ({
        state: { ...window.ufadState.last, error: window.ufadState.error },
        dom: {
          pred: document.getElementById('pred').textContent,
          score: document.getElementById('score').textContent,
          verdict: document.getElementById('verdict').textContent,
          anomaly: document.getElementById('verdict').dataset.anomaly,
        },
      }));
    };
    const shot = async (name) => {
      if (o.shots) await page.screenshot({ path: path.join(o.shots, name), fullPage: false });
    };

    // 1. Noise button.
    await page.click('#noise');
    const noise = await after(1);
    await shot('web_noise.png');

    // 2. A stroke drawn with the mouse: a vertical line, i.e. a "1".
    const box = await page.locator('#pad').boundingBox();
    await page.mouse.move(box.x + box.width * 0.5, box.y + box.height * 0.18);
    await page.mouse.down();
    for (let i = 1; i <= 12; i++) await page.mouse.move(box.x + box.width * (0.5 - 0.01 * i / 12), box.y + box.height * (0.18 + 0.64 * i / 12));
    await page.mouse.up();
    const drawn = await after(2);

    // 3. A real image through the file input (the same path as dropping it on the pad).
    await page.setInputFiles('#file', o.image);
    const image = await after(3);
    await shot('web_screenshot.png');

    // 4. A stricter threshold typed into the page flags the same image.
    const stricter = typeof image.state.score === 'number' ? image.state.score - 0.5 : 0;
    await page.fill('#thr', String(stricter));
    await page.dispatchEvent('#thr', 'change');
    const override = await after(4);

    process.stdout.write(JSON.stringify({ boot, noise, drawn, image, override, stricter, logs }) + '\n');
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  process.stderr.write(`e2e failed: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
