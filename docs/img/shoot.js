// Screenshots of the MLflow UI for docs/tracking.md, taken by a real browser (Chromium through playwright-core).
// Usage: node docs/img/shoot.js SHOTS.json OUT_DIR   (docs/img/tour.py writes SHOTS.json from the store)
// SHOTS.json: [{"name": "mlflow-runs", "url": "http://127.0.0.1:5000/#/...", "click": [css...], "type": "val/map"}]
const { chromium } = require('playwright-core');
const fs = require('fs');

(async () => {
  const [shotsFile, outDir] = process.argv.slice(2);
  const shots = JSON.parse(fs.readFileSync(shotsFile, 'utf8'));
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox'],
  });
  const page = await browser.newPage({ viewport: { width: 1440, height: 860 } });
  for (const shot of shots) {
    await page.goto(shot.url);
    await page.waitForTimeout(shot.wait || 8000);
    for (const sel of ['button[aria-label="Close"]', 'text=Got it']) {  // the assistant panel, tips
      const b = page.locator(sel).first();
      if (await b.isVisible().catch(() => false)) await b.click().catch(() => {});
    }
    for (const sel of shot.click || []) {
      await page.locator(sel).first().click({ timeout: 5000 }).catch(() => console.log(`${shot.name}: no ${sel}`));
      await page.waitForTimeout(2500);
    }
    if (shot.type) {
      await page.locator('input[placeholder^="Search metric"]').first().fill(shot.type).catch(() => {});
      await page.waitForTimeout(3000);
    }
    await page.screenshot({ path: `${outDir}/${shot.name}.png` });
    console.log(`${outDir}/${shot.name}.png`);
  }
  await browser.close();
})();
