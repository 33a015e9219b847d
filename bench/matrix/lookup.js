// Node: dns.lookup (getaddrinfo on libuv's pool) or, with `resolver HOST`,
// dns.Resolver (c-ares) asking A and AAAA. One JSON line per name on stdin.
const dns = require('dns');
const readline = require('readline');
const [mode, server] = process.argv.slice(2);
const resolver = new dns.promises.Resolver({ timeout: 1000, tries: 2 });
if (server) resolver.setServers([server]);

async function look(name) {
  if (mode === 'lookup') {
    const found = await dns.promises.lookup(name, { all: true });
    return found.map((x) => x.address);
  }
  const settled = await Promise.allSettled([resolver.resolve4(name), resolver.resolve6(name)]);
  const ok = settled.filter((s) => s.status === 'fulfilled').flatMap((s) => s.value);
  if (ok.length) return ok;
  // Both failed or were empty: the A query's error names the outcome.
  throw settled[0].status === 'rejected' ? settled[0].reason : settled[1].reason || { code: 'ENODATA' };
}

const rl = readline.createInterface({ input: process.stdin });
const queue = [];
let busy = false;
async function drain() {
  if (busy) return;
  busy = true;
  while (queue.length) {
    const name = queue.shift();
    const t = process.hrtime.bigint();
    const out = {};
    try { out.addresses = await look(name); } catch (e) { out.error = e.code || String(e); }
    out.elapsed_ms = Number(process.hrtime.bigint() - t) / 1e6;
    process.stdout.write(JSON.stringify(out) + '\n');
  }
  busy = false;
}
rl.on('line', (line) => { queue.push(line.trim()); drain(); });
