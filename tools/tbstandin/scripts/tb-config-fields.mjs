#!/usr/bin/env node
// Writes t/fixtures/thingsboard-config-fields.json: the fields of the
// ThingsBoard classes that read packaging/thingsboard/gift-rule-chain.json
// (the rule nodes' configuration classes, the rule chain export's own
// classes), for every release tag from v3.6 on, read from a git clone of
// thingsboard/thingsboard:
//
//   node tools/tbstandin/scripts/tb-config-fields.mjs /path/to/thingsboard.git > t/fixtures/thingsboard-config-fields.json
//
// Fields are the non-static fields a class declares (Lombok @Data: each is a
// JSON property).  Inherited ones are listed under "inherited" by hand.
import { execFileSync } from 'node:child_process';

const repo = process.argv[2];
if (!repo) { console.error('usage: tb-config-fields.mjs THINGSBOARD_GIT_DIR'); process.exit(2); }
const git = (...a) => execFileSync('git', ['--git-dir', repo, ...a], { encoding: 'utf8', maxBuffer: 1 << 26 });

const R = 'rule-engine/rule-engine-components/src/main/java/org/thingsboard/rule/engine';
const A = 'rule-engine/rule-engine-api/src/main/java/org/thingsboard/rule/engine/api';
const D = 'common/data/src/main/java/org/thingsboard/server/common/data';
const classes = {
  // rule node type (last part of the class name) -> its configuration class
  TbMsgTypeSwitchNode: `${A}/EmptyNodeConfiguration.java`,
  TbTransformMsgNode: `${R}/transform/TbTransformMsgNodeConfiguration.java`,
  TbJsFilterNode: `${R}/filter/TbJsFilterNodeConfiguration.java`,
  TbChangeOriginatorNode: `${R}/transform/TbChangeOriginatorNodeConfiguration.java`,
  TbSendRPCRequestNode: `${R}/rpc/TbSendRpcRequestNodeConfiguration.java`,
  TbSendRPCReplyNode: `${R}/rpc/TbSendRpcReplyNodeConfiguration.java`,
  // nested in TbChangeOriginatorNodeConfiguration
  RelationsQuery: `${R}/data/RelationsQuery.java`,
  RelationEntityTypeFilter: `${D}/relation/RelationEntityTypeFilter.java`,
  // the export format
  RuleChain: `${D}/rule/RuleChain.java`,
  RuleChainMetaData: `${D}/rule/RuleChainMetaData.java`,
  RuleNode: `${D}/rule/RuleNode.java`,
  NodeConnectionInfo: `${D}/rule/NodeConnectionInfo.java`,
};
const inherited = {
  RuleChain: ['id', 'createdTime', 'additionalInfo'],
  RuleNode: ['id', 'createdTime', 'additionalInfo'],
};

const vkey = (t) => t.slice(1).split('.').map(Number);
const cmp = (a, b) => { const x = vkey(a), y = vkey(b); for (let i = 0; i < Math.max(x.length, y.length); i++) { const d = (x[i] ?? -1) - (y[i] ?? -1); if (d) return d; } return 0; };
const tags = git('tag').split('\n').filter((t) => /^v(3\.([6-9]|\d\d)|[4-9]\.)[\d.]*$/.test(t)).sort(cmp);

function fields(src) {
  const out = [];
  for (const line of src.split('\n')) {
    const m = /^    (?:private|protected|public)\s+(?!static\b)(?:final\s+|transient\s+)*[\w<>, ?.\[\]]+\s+(\w+)\s*(?:=[^;]*)?;/.exec(line);
    if (m) out.push(m[1]);
  }
  return out;
}

const result = {
  about: 'Fields of ThingsBoard CE classes that read gift-rule-chain.json, per release tag, from thingsboard/thingsboard (written by tools/tbstandin/scripts/tb-config-fields.mjs). A rule node configuration is read by TbNodeUtils.convert -> JacksonUtil.treeToValue with OBJECT_MAPPER, which fails on unknown properties in every listed release: a node whose configuration has a field its class lacks does not start.',
  head: git('rev-parse', 'HEAD').trim(),
  tags,
  inherited,
  classes: {},
};
for (const [name, path] of Object.entries(classes)) {
  const groups = [];
  for (const t of tags) {
    let f;
    try { f = fields(git('show', `${t}:${path}`)); } catch { f = null; }
    const key = JSON.stringify(f);
    const g = groups.find((x) => JSON.stringify(x.fields) === key);
    if (g) g.tags.push(t); else groups.push({ tags: [t], fields: f });
  }
  result.classes[name] = { source: path, versions: groups };
}
// The message type switch's output labels: TbMsgType's rule node connections
// (the label of each type, "Other" for the rest).
{
  const path = `${D}/msg/TbMsgType.java`;
  const groups = [];
  for (const t of tags) {
    let f;
    try { f = [...git('show', `${t}:${path}`).matchAll(/^    [A-Z_]+\("([^"]+)"/gm)].map((m) => m[1]); } catch { f = null; }
    const key = JSON.stringify(f);
    const g = groups.find((x) => JSON.stringify(x.labels) === key);
    if (g) g.tags.push(t); else groups.push({ tags: [t], labels: f });
  }
  result.msgTypeLabels = { source: path, versions: groups };
}
process.stdout.write(JSON.stringify(result, null, 1) + '\n');
