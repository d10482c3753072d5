#!/usr/bin/env node
// Offline checks of deploy/k8s: renders the base, every overlay and monitoring/ with `kubectl kustomize`, checks
// every rendered object against the Kubernetes (kubernetes-models) and Prometheus Operator
// (@kubernetes-models/prometheus-operator) schemas, rejects unknown kinds and unknown fields, and then checks what
// a schema cannot: probes, ports, drain timing, flags, security context, references between objects, and that
// the monitoring copies match their sources.
//
//   node tests/deploy/validate_k8s.js REPO_ROOT [DELTASERVE_BINARY]
//
// With DELTASERVE_BINARY (an existing file), every flag in the flag files must be one `deltaserve --helpfull`
// lists. Exit status: 0 all good, 1 a check failed, 77 a tool is missing (kubectl, or `npm ci` not run).
'use strict';

const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const SKIP = 77;
const root = path.resolve(process.argv[2] || path.join(__dirname, '..', '..'));
const binary = process.argv[3] || '';

let yaml;
try {
  yaml = require('js-yaml');
  require.resolve('kubernetes-models/apps/v1');
  require.resolve('@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1');
} catch (e) {
  console.log(`SKIP: node packages missing (${e.message.split('\n')[0]}); run tests/deploy/install_node_deps.sh`);
  process.exit(SKIP);
}
try {
  execFileSync('kubectl', ['version', '--client'], { stdio: 'ignore' });
} catch (e) {
  console.log('SKIP: kubectl not found');
  process.exit(SKIP);
}

const failures = [];
let checks = 0;
function check(cond, what) {
  checks++;
  if (!cond) failures.push(what);
  return !!cond;
}

// ---------------------------------------------------------------------------------------------------------------
// Rendering and schemas

const K8S = path.join(root, 'deploy', 'k8s');
const TARGETS = ['base', 'overlays/single', 'overlays/replicated', 'monitoring'];

function render(dir) {
  const out = execFileSync('kubectl', ['kustomize', path.join(K8S, dir)], {
    encoding: 'utf8', maxBuffer: 64 << 20, stdio: ['ignore', 'pipe', 'pipe'],
  });
  return yaml.loadAll(out).filter((d) => d != null);
}

// apiVersion -> the module exporting its kinds.
function modelModule(apiVersion) {
  if (apiVersion === 'monitoring.coreos.com/v1' || apiVersion === 'monitoring.coreos.com/v1alpha1') {
    return `@kubernetes-models/prometheus-operator/${apiVersion}`;
  }
  if (!/^[a-z0-9.]+(\/v[0-9a-z]+)?$/.test(apiVersion)) return null;
  return `kubernetes-models/${apiVersion}`;  // "v1" -> kubernetes-models/v1, "apps/v1" -> kubernetes-models/apps/v1
}

function modelClass(doc) {
  const mod = modelModule(String(doc.apiVersion || ''));
  if (!mod) return null;
  let m;
  try {
    m = require(mod);
  } catch (e) {
    return null;
  }
  const cls = m[doc.kind];
  return typeof cls === 'function' ? { cls, mod } : null;
}

// Unknown fields. The schemas of kubernetes-models accept extra properties (as the API server's non-strict decoding
// does), so a typo such as `readinesProbe` would pass; kubectl's strict field validation needs a server. The
// property names of every type are in the packages' TypeScript declarations: walk the object along them.
const typeCache = new Map();  // "<file>#<Interface>" -> {props: {name: typeText}, imports: {Name: file}} | null

function dtsFile(spec, fromFile) {
  let p;
  if (spec.startsWith('.')) p = path.resolve(path.dirname(fromFile), spec);
  else {
    try {
      p = require.resolve(spec + '.d.ts', { paths: [__dirname] });
      return p;
    } catch (e) {
      try {
        p = require.resolve(spec, { paths: [__dirname] }).replace(/\.js$/, '');
      } catch (e2) {
        return null;
      }
    }
  }
  if (!p.endsWith('.d.ts')) p += '.d.ts';
  return fs.existsSync(p) ? p : null;
}

function parseDts(file) {
  if (typeCache.has(file)) return typeCache.get(file);
  const text = fs.readFileSync(file, 'utf8');
  const imports = {};
  for (const m of text.matchAll(/import \{([^}]*)\} from "([^"]+)";/g)) {
    for (const name of m[1].split(',').map((s) => s.trim()).filter(Boolean)) {
      const [orig, alias] = name.split(/\s+as\s+/);
      imports[(alias || orig).trim()] = { file: dtsFile(m[2], file), name: orig.trim() };
    }
  }
  // Interfaces: `export interface IName {` ... matching `}` at column 0.
  const interfaces = {};
  for (const m of text.matchAll(/^export interface (\w+)[^{]*\{\n([\s\S]*?)^\}/gm)) {
    interfaces[m[1]] = m[2];
  }
  // Aliases: `export { IDeploymentSpec as IIoK8sApiAppsV1DeploymentSpec, ... }`.
  const aliases = {};
  for (const m of text.matchAll(/export \{([^}]*)\};/g)) {
    for (const part of m[1].split(',')) {
      const [orig, alias] = part.trim().split(/\s+as\s+/);
      if (alias) aliases[alias.trim()] = orig.trim();
    }
  }
  const parsed = { text, imports, interfaces, aliases };
  typeCache.set(file, parsed);
  return parsed;
}

// Top-level members of an object type body (a string between braces): {name: typeText}.
function members(body) {
  const out = {};
  let depth = 0;
  let i = 0;
  const n = body.length;
  while (i < n) {
    // Skip whitespace, comments.
    if (body.startsWith('/*', i)) {
      i = body.indexOf('*/', i) + 2;
      continue;
    }
    if (/\s/.test(body[i])) {
      i++;
      continue;
    }
    // A member: "name"?: type;  or  name?: type;  or [key: string]: type;
    const m = /^(?:"([^"]+)"|([A-Za-z_$][\w$]*)|\[[^\]]*\])\??\s*:\s*/.exec(body.slice(i));
    if (!m) {
      // Not a member (e.g. a method): skip to the end of the line.
      const nl = body.indexOf('\n', i);
      i = nl < 0 ? n : nl + 1;
      continue;
    }
    const name = m[1] || m[2] || '[index]';
    i += m[0].length;
    const start = i;
    depth = 0;
    while (i < n) {
      const c = body[i];
      if (c === '{' || c === '<' || c === '(' || c === '[') depth++;
      else if (c === '}' || c === '>' || c === ')' || c === ']') depth--;
      else if (c === ';' && depth === 0) break;
      if (c === '=' && body[i + 1] === '>') i++;  // arrow in a function type
      i++;
    }
    out[name] = body.slice(start, i).trim();
    i++;
  }
  return out;
}

// Resolves a type text within a file to a description: {kind: 'object', props, index} | {kind: 'array', item} |
// {kind: 'any'}.
function resolveType(typeText, file, depth = 0) {
  let t = typeText.trim();
  if (depth > 50) return { kind: 'any' };
  t = t.replace(/^\((.*)\)$/s, '$1').trim();
  let m;
  if ((m = /^Array<([\s\S]*)>$/.exec(t))) return { kind: 'array', item: () => resolveType(m[1], file, depth + 1) };
  if ((m = /^([\s\S]*)\[\]$/.exec(t)) && !t.includes('|')) {
    return { kind: 'array', item: () => resolveType(m[1], file, depth + 1) };
  }
  if (t.startsWith('{')) {
    const body = t.slice(1, t.lastIndexOf('}'));
    const props = members(body);
    const index = props['[index]'];
    delete props['[index]'];
    return {
      kind: 'object',
      props: Object.fromEntries(Object.entries(props).map(([k, v]) => [k, () => resolveType(v, file, depth + 1)])),
      index: index !== undefined ? () => resolveType(index, file, depth + 1) : null,
    };
  }
  if (/^[A-Z]\w*$/.test(t)) {
    const parsed = parseDts(file);
    const name = parsed.aliases[t] || t;
    if (parsed.interfaces[name] !== undefined) {
      return resolveType('{' + parsed.interfaces[name] + '}', file, depth + 1);
    }
    const imp = parsed.imports[t];
    if (imp && imp.file) return resolveType(imp.name, imp.file, depth + 1);
    // A type alias in this file: `export type X = ...;`.
    const re = new RegExp(`^export (?:declare )?type ${name}\\s*=\\s*([\\s\\S]*?);\\n`, 'm');
    const am = re.exec(parsed.text);
    if (am) return resolveType(am[1], file, depth + 1);
    return { kind: 'any' };
  }
  return { kind: 'any' };  // primitives, unions, string literals, IntOrString ...
}

function unknownFields(value, typeFn, where, out) {
  const type = typeFn();
  if (value == null || type.kind === 'any') return;
  if (type.kind === 'array') {
    if (Array.isArray(value)) value.forEach((v, i) => unknownFields(v, type.item, `${where}[${i}]`, out));
    return;
  }
  if (type.kind === 'object' && typeof value === 'object' && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      if (type.props[k]) unknownFields(v, type.props[k], `${where}.${k}`, out);
      else if (type.index) unknownFields(v, type.index, `${where}.${k}`, out);
      else out.push(`${where}.${k}`);
    }
  }
}

function kindFile(doc) {
  const mod = modelModule(doc.apiVersion);
  return dtsFile(`${mod}/${doc.kind}`, __filename);
}

function validateDoc(doc, where) {
  const id = `${where}: ${doc.kind}/${doc.metadata && doc.metadata.name}`;
  const model = modelClass(doc);
  if (!check(model, `${id}: unknown apiVersion/kind ${doc.apiVersion} ${doc.kind} (no schema to check it against)`)) {
    return;
  }
  try {
    new model.cls(doc).validate();
    check(true, '');
  } catch (e) {
    check(false, `${id}: schema: ${e.message}`);
  }
  const file = kindFile(doc);
  if (!check(file, `${id}: no type declarations for ${doc.kind}`)) return;
  const parsed = parseDts(file);
  const iface = Object.keys(parsed.interfaces).find((n) => n === `I${doc.kind}`);
  if (!check(iface, `${id}: no interface I${doc.kind} in ${file}`)) return;
  const bad = [];
  unknownFields(doc, () => resolveType(iface, file), doc.kind, bad);
  check(bad.length === 0, `${id}: unknown field(s): ${bad.join(', ')}`);
}

// ---------------------------------------------------------------------------------------------------------------
// Semantic checks

function byKind(docs, kind, name) {
  return docs.filter((d) => d.kind === kind && (name === undefined || d.metadata.name === name));
}

function parseFlags(text) {
  const flags = new Map();
  const dupes = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const m = /^--([A-Za-z0-9_]+)(?:=(.*))?$/.exec(line);
    if (!m) {
      dupes.push(`not a --flag=value line: ${line}`);
      continue;
    }
    if (flags.has(m[1])) dupes.push(`--${m[1]} twice`);
    flags.set(m[1], m[2] === undefined ? 'true' : m[2]);
  }
  return { flags, problems: dupes };
}

function hostPort(v) {
  const m = /^(.*):(\d+)$/.exec(v || '');
  return m ? { host: m[1], port: Number(m[2]) } : null;
}

function cpuCores(q) {
  if (q === undefined) return null;
  const s = String(q);
  return s.endsWith('m') ? Number(s.slice(0, -1)) / 1000 : Number(s);
}

// Where a container path lands: the volume mounted at the longest prefix, or null (the root filesystem).
function mountFor(container, volumes, p) {
  let best = null;
  for (const vm of container.volumeMounts || []) {
    const mp = vm.mountPath.replace(/\/$/, '');
    if (p === mp || p.startsWith(mp + '/')) {
      if (!best || mp.length > best.mountPath.length) best = { ...vm, mountPath: mp };
    }
  }
  if (!best) return null;
  return { mount: best, volume: volumes.find((v) => v.name === best.name) };
}

const VOLUME_SOURCES = ['emptyDir', 'persistentVolumeClaim', 'configMap', 'secret', 'projected', 'hostPath',
  'downwardAPI', 'ephemeral', 'csi', 'nfs', 'image'];

function checkPodSecurity(id, pod) {
  const psc = pod.securityContext || {};
  check(psc.runAsNonRoot === true, `${id}: pod securityContext.runAsNonRoot must be true`);
  check(psc.runAsUser > 0, `${id}: pod runAsUser must be a non-root uid`);
  check(psc.seccompProfile && psc.seccompProfile.type === 'RuntimeDefault', `${id}: seccomp RuntimeDefault`);
  check(pod.automountServiceAccountToken === false, `${id}: automountServiceAccountToken false`);
  for (const c of pod.containers) {
    const sc = c.securityContext || {};
    check(sc.runAsNonRoot !== false && (sc.runAsUser === undefined || sc.runAsUser > 0),
      `${id}/${c.name}: container must not run as root`);
    check(sc.readOnlyRootFilesystem === true, `${id}/${c.name}: readOnlyRootFilesystem`);
    check(sc.allowPrivilegeEscalation === false, `${id}/${c.name}: allowPrivilegeEscalation false`);
    check(sc.capabilities && JSON.stringify(sc.capabilities.drop) === '["ALL"]', `${id}/${c.name}: drop ALL caps`);
    check(!sc.privileged, `${id}/${c.name}: not privileged`);
  }
  for (const v of pod.volumes || []) {
    const sources = VOLUME_SOURCES.filter((s) => v[s] != null);
    check(sources.length === 1, `${id}: volume ${v.name} has ${sources.length} sources (${sources.join(', ')})`);
  }
  for (const c of pod.containers) {
    for (const vm of c.volumeMounts || []) {
      check((pod.volumes || []).some((v) => v.name === vm.name), `${id}/${c.name}: mount of unknown volume ${vm.name}`);
    }
  }
}

// References from pods to ConfigMaps, Secrets and PVCs that the render must contain (optional ones excepted).
function checkReferences(where, docs, pod, id) {
  const have = (kind, name) => byKind(docs, kind, name).length > 0;
  for (const v of pod.volumes || []) {
    if (v.configMap) check(v.configMap.optional || have('ConfigMap', v.configMap.name), `${id}: ConfigMap ${v.configMap.name} missing`);
    if (v.secret) check(v.secret.optional || have('Secret', v.secret.secretName), `${id}: Secret ${v.secret.secretName} missing`);
    if (v.persistentVolumeClaim) {
      check(have('PersistentVolumeClaim', v.persistentVolumeClaim.claimName),
        `${id}: PersistentVolumeClaim ${v.persistentVolumeClaim.claimName} missing`);
    }
    for (const s of (v.projected && v.projected.sources) || []) {
      if (s.configMap) check(s.configMap.optional || have('ConfigMap', s.configMap.name), `${id}: ConfigMap ${s.configMap.name} missing`);
      if (s.secret) check(s.secret.optional || have('Secret', s.secret.name), `${id}: Secret ${s.secret.name} missing`);
    }
  }
}

// The files a projected or configMap volume shows: {relative path: content or null (a Secret not rendered)}.
function volumeFiles(docs, volume) {
  const files = {};
  const fromData = (obj, items, isSecret) => {
    const data = Object.assign({}, obj ? obj.data : {}, obj ? obj.stringData : {});
    const decode = (k) => (obj == null ? null
      : isSecret && obj.data && obj.data[k] !== undefined ? Buffer.from(obj.data[k], 'base64').toString('utf8') : data[k]);
    if (items) for (const it of items) files[it.path] = decode(it.key);
    else for (const k of Object.keys(data)) files[k] = decode(k);
  };
  const sources = volume.projected ? volume.projected.sources
    : volume.configMap ? [{ configMap: { name: volume.configMap.name, items: volume.configMap.items } }]
    : volume.secret ? [{ secret: { name: volume.secret.secretName, items: volume.secret.items } }] : [];
  for (const s of sources) {
    if (s.configMap) fromData(byKind(docs, 'ConfigMap', s.configMap.name)[0], s.configMap.items, false);
    if (s.secret) fromData(byKind(docs, 'Secret', s.secret.name)[0], s.secret.items, true);
  }
  return files;
}

let knownFlags = null;
if (binary && fs.existsSync(binary)) {
  try {
    const help = execFileSync(binary, ['--helpfull'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    knownFlags = new Set([...help.matchAll(/^\s+--([A-Za-z0-9_]+) \(/gm)].map((m) => m[1]));
  } catch (e) {
    // absl exits 1 after --helpfull on some versions; its output is still there.
    const help = String(e.stdout || '') + String(e.stderr || '');
    knownFlags = new Set([...help.matchAll(/^\s+--([A-Za-z0-9_]+) \(/gm)].map((m) => m[1]));
  }
  if (knownFlags.size === 0) knownFlags = null;
}
if (!knownFlags) console.log(`note: no deltaserve binary${binary ? ' at ' + binary : ''}: flag names not checked against --helpfull`);

function checkDeltaserve(where, docs) {
  const id = `${where}: Deployment/deltaserve`;
  const dep = byKind(docs, 'Deployment', 'deltaserve')[0];
  if (!check(dep, `${where}: no Deployment deltaserve`)) return null;
  const pod = dep.spec.template.spec;
  const c = pod.containers.find((x) => x.name === 'deltaserve');
  if (!check(c, `${id}: no container deltaserve`)) return null;
  check(c.image === 'deltaserve:0.8.0', `${id}: image deltaserve:0.8.0, not ${c.image}`);
  check(pod.serviceAccountName === 'deltaserve' && byKind(docs, 'ServiceAccount', 'deltaserve').length === 1,
    `${id}: ServiceAccount deltaserve`);
  const sa = byKind(docs, 'ServiceAccount', 'deltaserve')[0];
  check(sa && sa.automountServiceAccountToken === false, `${where}: ServiceAccount automountServiceAccountToken false`);

  // Flags: the --flagfile arguments, read from the volume mounted at their directory.
  const volumes = pod.volumes || [];
  const flags = new Map();
  const origin = new Map();
  for (const a of c.args || []) {
    const m = /^--flagfile=(.+)$/.exec(a);
    if (!check(m, `${id}: argument ${a} is not a --flagfile (flags belong in the ConfigMap)`)) continue;
    for (const f of m[1].split(',')) {
      const mf = mountFor(c, volumes, f);
      if (!check(mf && mf.volume, `${id}: ${f} is on no volume`)) continue;
      const rel = path.posix.relative(mf.mount.mountPath, f);
      const content = volumeFiles(docs, mf.volume)[rel];
      if (!check(typeof content === 'string', `${id}: ${f} is not in volume ${mf.volume.name}`)) continue;
      const parsed = parseFlags(content);
      parsed.problems.forEach((p) => check(false, `${id}: ${f}: ${p}`));
      for (const [k, v] of parsed.flags) {
        check(!flags.has(k), `${id}: --${k} set in ${origin.get(k)} and again in ${f} (keep the files disjoint)`);
        flags.set(k, v);
        origin.set(k, f);
        if (knownFlags) check(knownFlags.has(k), `${id}: ${f}: --${k} is not a deltaserve flag (--helpfull)`);
      }
    }
  }
  check(flags.size > 0, `${id}: no flags read`);

  // Ports: container ports match the listen flags; everything listens on all interfaces.
  const port = (name) => (c.ports || []).find((p) => p.name === name);
  for (const [name, flag] of [['grpc', 'listen'], ['metrics', 'metrics_listen'], ['health', 'health_listen']]) {
    const hp = hostPort(flags.get(flag));
    if (!check(hp, `${id}: --${flag} missing or not host:port`)) continue;
    check(hp.host === '0.0.0.0' || hp.host === '[::]', `${id}: --${flag} must listen on all interfaces, not ${hp.host}`);
    check(port(name) && port(name).containerPort === hp.port,
      `${id}: container port ${name} (${port(name) && port(name).containerPort}) != --${flag} port ${hp.port}`);
  }
  const health = hostPort(flags.get('health_listen'));
  const healthPort = health && health.port;

  // Probes: native gRPC on the health port; liveness/startup ask "liveness", readiness "readiness".
  for (const [probe, service] of [['startupProbe', 'liveness'], ['livenessProbe', 'liveness'], ['readinessProbe', 'readiness']]) {
    const p = c[probe];
    if (!check(p && p.grpc, `${id}: ${probe} must be a native gRPC probe`)) continue;
    check(p.grpc.port === healthPort, `${id}: ${probe} port ${p.grpc.port} != health port ${healthPort}`);
    check(p.grpc.service === service, `${id}: ${probe} service "${p.grpc.service}" != "${service}"`);
    check(!p.httpGet && !p.exec && !p.tcpSocket, `${id}: ${probe} has a second handler`);
  }
  if (c.startupProbe) {
    const budget = (c.startupProbe.periodSeconds || 10) * (c.startupProbe.failureThreshold || 3);
    check(budget >= 300, `${id}: startupProbe allows only ${budget} s for start-up (a large model load needs >= 300)`);
  }

  // Drain: preStop signals and sleeps; the grace period covers preStop + drain flags.
  const pre = c.lifecycle && c.lifecycle.preStop && c.lifecycle.preStop.exec && c.lifecycle.preStop.exec.command;
  const preOk = check(Array.isArray(pre) && pre.length === 3 && pre[0] === '/bin/sh' && pre[1] === '-c' &&
    /^kill -USR1 1; sleep \d+$/.test(pre[2]), `${id}: preStop must be ["/bin/sh","-c","kill -USR1 1; sleep N"], is ${JSON.stringify(pre)}`);
  const sleep = preOk ? Number(/sleep (\d+)/.exec(pre[2])[1]) : 0;
  const drainDelay = Number(flags.get('drain_delay_s') || 0);
  const drainSeconds = Number(flags.has('drain_seconds') ? flags.get('drain_seconds') : 30);
  const grace = pod.terminationGracePeriodSeconds === undefined ? 30 : pod.terminationGracePeriodSeconds;
  check(grace >= sleep + drainDelay + drainSeconds + 5,
    `${id}: terminationGracePeriodSeconds ${grace} < preStop sleep ${sleep} + --drain_delay_s ${drainDelay} + --drain_seconds ${drainSeconds} + 5 s margin`);

  // Resources and threads.
  const res = c.resources || {};
  check(res.requests && res.requests.cpu && res.requests.memory, `${id}: resources.requests cpu and memory`);
  check(res.limits && res.limits.cpu && res.limits.memory, `${id}: resources.limits cpu and memory`);
  const cpu = cpuCores(res.limits && res.limits.cpu);
  check(Number(flags.get('threads')) === Math.ceil(cpu), `${id}: --threads ${flags.get('threads')} != CPU limit ${cpu}`);
  const omp = (c.env || []).find((e) => e.name === 'OMP_NUM_THREADS');
  check(omp && omp.valueFrom && omp.valueFrom.resourceFieldRef && omp.valueFrom.resourceFieldRef.resource === 'limits.cpu',
    `${id}: OMP_NUM_THREADS from limits.cpu`);

  // Security.
  checkPodSecurity(id, pod);
  check(pod.securityContext.runAsUser === 10001 && (c.securityContext || {}).runAsUser === 10001,
    `${id}: runs as uid 10001 (the image's user)`);
  check(!(c.volumeMounts || []).some((m) => m.subPath), `${id}: no subPath mounts (Secret updates would not reach them)`);

  // Files the flags name: config on the read-only config volume; data on writable volumes.
  const configFile = (flag, wantOptional) => {
    const p = flags.get(flag);
    if (!p) return;
    const mf = mountFor(c, volumes, p);
    if (!check(mf && mf.volume, `${id}: --${flag}=${p} is on no volume`)) return;
    check(mf.mount.readOnly === true, `${id}: --${flag}=${p} should be on a read-only mount`);
    const rel = path.posix.relative(mf.mount.mountPath, p);
    check(rel in volumeFiles(docs, mf.volume), `${id}: --${flag}=${p}: no such file in volume ${mf.volume.name}`);
  };
  configFile('tenants_file');
  configFile('tls_cert');
  configFile('tls_key');
  for (const flag of ['store_dir', 'jobs_dir', 'audit_log']) {
    const p = flags.get(flag);
    if (!p) continue;
    const mf = mountFor(c, volumes, p);
    check(mf && mf.volume && !mf.mount.readOnly && (mf.volume.emptyDir || mf.volume.persistentVolumeClaim),
      `${id}: --${flag}=${p} must be on a writable emptyDir or PVC (the root filesystem is read-only)`);
  }
  const tmp = mountFor(c, volumes, '/tmp/x');
  check(tmp && tmp.volume && tmp.volume.emptyDir, `${id}: /tmp must be an emptyDir`);

  // The tenants Secret of the repository holds no token.
  const tenantsSecret = byKind(docs, 'Secret', 'deltaserve-tenants')[0];
  if (check(tenantsSecret, `${where}: Secret deltaserve-tenants`)) {
    const raw = tenantsSecret.data && tenantsSecret.data['tenants.json'];
    let t = null;
    try {
      t = JSON.parse(Buffer.from(raw || '', 'base64').toString('utf8'));
    } catch (e) {
      check(false, `${where}: tenants.json is not JSON: ${e.message}`);
    }
    if (t) {
      check(t.format === 1, `${where}: tenants.json format 1`);
      const tokens = Object.values(t.tenants || {}).flatMap((x) => x.tokens || []);
      check(tokens.length === 0, `${where}: the example tenants.json must hold no tokens`);
    }
  }

  // Service, PDB: select the pods, target named ports.
  const podLabels = dep.spec.template.metadata.labels || {};
  const selects = (sel) => sel && Object.entries(sel).every(([k, v]) => podLabels[k] === v);
  check(selects(dep.spec.selector.matchLabels), `${id}: selector does not match the pod labels`);
  const svc = byKind(docs, 'Service', 'deltaserve')[0];
  if (check(svc, `${where}: Service deltaserve`)) {
    check(selects(svc.spec.selector), `${where}: Service selector does not match the pods`);
    check(svc.spec.type === undefined || svc.spec.type === 'ClusterIP', `${where}: Service is ClusterIP`);
    for (const [name, proto] of [['grpc', 'grpc'], ['metrics', 'http']]) {
      const sp = svc.spec.ports.find((p) => p.name === name);
      if (!check(sp, `${where}: Service port ${name}`)) continue;
      check(sp.appProtocol === proto, `${where}: Service port ${name} appProtocol ${proto}`);
      const target = typeof sp.targetPort === 'string' ? port(sp.targetPort) : (c.ports || []).find((p) => p.containerPort === sp.targetPort);
      check(target, `${where}: Service port ${name} targets no container port`);
    }
    check(!svc.spec.ports.some((p) => p.name === 'health'), `${where}: the health port is for the kubelet only`);
  }
  const pdb = byKind(docs, 'PodDisruptionBudget', 'deltaserve')[0];
  if (check(pdb, `${where}: PodDisruptionBudget deltaserve`)) {
    check(pdb.spec.maxUnavailable === 1, `${where}: PDB maxUnavailable 1`);
    check(selects(pdb.spec.selector.matchLabels), `${where}: PDB selector does not match the pods`);
  }
  checkReferences(where, docs, pod, id);
  return { dep, pod, c, flags };
}

function checkOverlaySingle(where, docs, d) {
  const { dep, pod, flags } = d;
  check(dep.spec.replicas === 1, `${where}: 1 replica`);
  check(dep.spec.strategy && dep.spec.strategy.type === 'Recreate', `${where}: strategy Recreate (RWO volume)`);
  const data = (pod.volumes || []).find((v) => v.name === 'data');
  check(data && data.persistentVolumeClaim, `${where}: volume data is the PVC`);
  check(flags.get('store_dir') && !flags.get('store_url'), `${where}: filesystem store (--store_dir, no --store_url)`);
  check(flags.get('jobs_dir'), `${where}: --jobs_dir`);
  const pvc = byKind(docs, 'PersistentVolumeClaim', 'deltaserve-data')[0];
  check(pvc && pvc.spec.accessModes.includes('ReadWriteOnce'), `${where}: PVC deltaserve-data ReadWriteOnce`);
}

function checkOverlayReplicated(where, docs, d) {
  const { dep, pod, c, flags } = d;
  check(dep.spec.replicas >= 2, `${where}: several replicas`);
  const ru = dep.spec.strategy && dep.spec.strategy.rollingUpdate;
  check(dep.spec.strategy && dep.spec.strategy.type === 'RollingUpdate' && ru && ru.maxUnavailable === 0 && ru.maxSurge === 1,
    `${where}: RollingUpdate maxUnavailable 0 maxSurge 1`);
  check(/^https?:\/\//.test(flags.get('store_url') || ''), `${where}: --store_url`);
  check(Number(flags.get('store_resolve_ttl_s')) > 0, `${where}: --store_resolve_ttl_s > 0 (the label propagation bound)`);
  const cache = mountFor(c, pod.volumes, flags.get('store_dir') || '/nonexistent');
  check(cache && cache.volume && cache.volume.emptyDir, `${where}: --store_dir (the local cache) on an emptyDir`);
  check(!(pod.volumes || []).some((v) => v.persistentVolumeClaim), `${where}: replicas share no PVC`);
  check((pod.topologySpreadConstraints || []).length > 0 || (pod.affinity && pod.affinity.podAntiAffinity),
    `${where}: replicas spread over nodes`);
  const hpa = byKind(docs, 'HorizontalPodAutoscaler', 'deltaserve')[0];
  if (check(hpa, `${where}: HorizontalPodAutoscaler deltaserve`)) {
    check(hpa.apiVersion === 'autoscaling/v2', `${where}: HPA autoscaling/v2`);
    check(hpa.spec.scaleTargetRef.kind === 'Deployment' && hpa.spec.scaleTargetRef.name === 'deltaserve', `${where}: HPA targets deltaserve`);
    check(hpa.spec.minReplicas === dep.spec.replicas, `${where}: HPA minReplicas == the Deployment's replicas`);
    const metric = hpa.spec.metrics.find((m) => m.type === 'Pods');
    if (check(metric, `${where}: HPA on a Pods metric`)) {
      const adapter = yaml.load(fs.readFileSync(path.join(K8S, 'overlays/replicated/prometheus-adapter-config.yaml'), 'utf8'));
      const names = (adapter.rules || []).map((r) => r.name && r.name.as);
      check(names.includes(metric.pods.metric.name),
        `${where}: HPA metric ${metric.pods.metric.name} is served by no rule in prometheus-adapter-config.yaml`);
      for (const r of adapter.rules || []) {
        check(r.seriesQuery && r.metricsQuery && r.resources && r.name, `${where}: adapter rule incomplete`);
      }
    }
  }
  // The registry the store URL names, when the component renders it.
  const host = /^https?:\/\/([^:/]+)(?::(\d+))?/.exec(flags.get('store_url') || '');
  const regSvc = host && byKind(docs, 'Service', host[1])[0];
  if (regSvc) {
    check(regSvc.spec.ports.some((p) => p.port === Number(host[2] || 80)), `${where}: Service ${host[1]} has port ${host[2]}`);
    const reg = byKind(docs, 'Deployment').find((x) =>
      Object.entries(regSvc.spec.selector).every(([k, v]) => (x.spec.template.metadata.labels || {})[k] === v));
    if (check(reg, `${where}: no Deployment behind Service ${host[1]}`)) {
      checkPodSecurity(`${where}: Deployment/${reg.metadata.name}`, reg.spec.template.spec);
      checkReferences(where, docs, reg.spec.template.spec, `${where}: Deployment/${reg.metadata.name}`);
      const env = reg.spec.template.spec.containers[0].env || [];
      check(env.some((e) => e.name === 'REGISTRY_STORAGE_DELETE_ENABLED' && e.value === 'true'),
        `${where}: registry with deletes enabled`);
    }
  } else {
    console.log(`note: ${where}: no Service for ${flags.get('store_url')} rendered (bring your own registry)`);
  }
}

// Equal as data: key order does not matter (kustomize sorts keys), values and list order do.
function canonical(v) {
  if (Array.isArray(v)) return v.map(canonical);
  if (v && typeof v === 'object') return Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]));
  return v;
}
function deepEqual(a, b) {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

function checkMonitoring(where, docs, baseDocs) {
  const pm = byKind(docs, 'PodMonitor', 'deltaserve')[0] || byKind(docs, 'ServiceMonitor', 'deltaserve')[0];
  const base = byKind(baseDocs, 'Deployment', 'deltaserve')[0];
  if (check(pm, `${where}: a PodMonitor or ServiceMonitor deltaserve`) && base) {
    const labels = base.spec.template.metadata.labels;
    const sel = pm.spec.selector.matchLabels || {};
    check(Object.entries(sel).every(([k, v]) => labels[k] === v), `${where}: ${pm.kind} selector does not match the pods`);
    const endpoints = pm.spec.podMetricsEndpoints || pm.spec.endpoints || [];
    const ports = base.spec.template.spec.containers[0].ports.map((p) => p.name);
    for (const e of endpoints) check(ports.includes(e.port), `${where}: ${pm.kind} port ${e.port} is no container port`);
    check(endpoints.length > 0 && endpoints.every((e) => (e.path || '/metrics') === '/metrics'), `${where}: scrapes /metrics`);
  }
  // PrometheusRule == deploy/prometheus/alerts.yml, rule for rule.
  const pr = byKind(docs, 'PrometheusRule', 'deltaserve')[0];
  const alerts = yaml.load(fs.readFileSync(path.join(root, 'deploy/prometheus/alerts.yml'), 'utf8'));
  if (check(pr, `${where}: PrometheusRule deltaserve`)) {
    const a = alerts.groups;
    const b = pr.spec.groups;
    check(a.length === b.length, `${where}: PrometheusRule has ${b.length} groups, alerts.yml ${a.length}`);
    for (let i = 0; i < Math.max(a.length, b.length); i++) {
      const ga = a[i] || { rules: [] };
      const gb = b[i] || { rules: [] };
      check(ga.name === gb.name && ga.interval === gb.interval, `${where}: group ${i} ${ga.name} != ${gb.name}`);
      for (let j = 0; j < Math.max(ga.rules.length, gb.rules.length); j++) {
        const ra = ga.rules[j];
        const rb = gb.rules[j];
        const name = (ra && (ra.alert || ra.record)) || (rb && (rb.alert || rb.record));
        check(deepEqual(ra, rb), `${where}: rule ${name} differs from deploy/prometheus/alerts.yml (run deploy/k8s/monitoring/sync.sh)`);
      }
    }
  }
  // Every alert: for (except instant ones), severity, summary, description, runbook.
  for (const g of alerts.groups) {
    for (const r of g.rules.filter((x) => x.alert)) {
      const lab = r.labels || {};
      const ann = r.annotations || {};
      check(['critical', 'warning', 'info'].includes(lab.severity), `alerts.yml: ${r.alert}: severity label`);
      check(ann.summary && ann.description, `alerts.yml: ${r.alert}: summary and description`);
      check(/^docs\/OPERATIONS\.md#[a-z0-9-]+$/.test(ann.runbook || ''), `alerts.yml: ${r.alert}: runbook docs/OPERATIONS.md#anchor`);
      check(r.for || r.alert === 'DeltaserveStoreDataLoss', `alerts.yml: ${r.alert}: a for: duration`);
    }
  }
  // Grafana dashboard ConfigMap: the file of deploy/grafana, labelled for the sidecar.
  const cm = byKind(docs, 'ConfigMap', 'deltaserve-grafana-dashboard')[0];
  const source = fs.readFileSync(path.join(root, 'deploy/grafana/deltaserve-dashboard.json'), 'utf8');
  if (check(cm, `${where}: ConfigMap deltaserve-grafana-dashboard`)) {
    check(cm.metadata.labels && cm.metadata.labels.grafana_dashboard === '1', `${where}: label grafana_dashboard "1"`);
    check(cm.data['deltaserve-dashboard.json'] === source, `${where}: dashboard differs from deploy/grafana (run sync.sh)`);
    try {
      const dash = JSON.parse(cm.data['deltaserve-dashboard.json']);
      check(dash.uid && Array.isArray(dash.panels), `${where}: dashboard has a uid and panels`);
    } catch (e) {
      check(false, `${where}: dashboard is not JSON: ${e.message}`);
    }
  }
  const prov = yaml.load(fs.readFileSync(path.join(K8S, 'monitoring/grafana-provisioning/dashboards.yaml'), 'utf8'));
  check(prov.apiVersion === 1 && prov.providers.length > 0 && prov.providers.every((p) => p.type === 'file' && p.options && p.options.path),
    'grafana-provisioning/dashboards.yaml: apiVersion 1, file providers with a path');
  const ds = yaml.load(fs.readFileSync(path.join(K8S, 'monitoring/grafana-provisioning/datasources.yaml'), 'utf8'));
  check(ds.apiVersion === 1 && ds.datasources.some((d) => d.type === 'prometheus'), 'grafana-provisioning/datasources.yaml: a prometheus data source');
}

// ---------------------------------------------------------------------------------------------------------------

const rendered = {};
for (const t of TARGETS) {
  try {
    rendered[t] = render(t);
  } catch (e) {
    check(false, `kubectl kustomize deploy/k8s/${t} failed: ${String(e.stderr || e.message).trim()}`);
    rendered[t] = [];
  }
  let n = 0;
  for (const doc of rendered[t]) {
    validateDoc(doc, t);
    n++;
  }
  console.log(`rendered deploy/k8s/${t}: ${n} objects (${[...new Set(rendered[t].map((d) => d.kind))].join(', ')})`);
}

for (const t of ['base', 'overlays/single', 'overlays/replicated']) {
  const d = checkDeltaserve(t, rendered[t]);
  if (!d) continue;
  if (t === 'overlays/single') checkOverlaySingle(t, rendered[t], d);
  if (t === 'overlays/replicated') checkOverlayReplicated(t, rendered[t], d);
}
checkMonitoring('monitoring', rendered.monitoring, rendered.base);

// Self-test of the unknown-field walk: a typo must be caught.
{
  const dep = JSON.parse(JSON.stringify(byKind(rendered['overlays/single'], 'Deployment', 'deltaserve')[0] || {}));
  if (dep.spec) {
    dep.spec.template.spec.containers[0].readinesProbe = {};
    const bad = [];
    const file = kindFile(dep);
    unknownFields(dep, () => resolveType('IDeployment', file), 'Deployment', bad);
    check(bad.length === 1 && bad[0].endsWith('.readinesProbe'), `self-test: the unknown-field walk missed a typo (${bad})`);
  }
}

for (const f of failures) console.log(`FAIL: ${f}`);
console.log(`${checks - failures.length} passed, ${failures.length} failed`);
process.exit(failures.length ? 1 : 0);
