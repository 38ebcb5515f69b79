// The rule chain export (gift-rule-chain.json), run as ThingsBoard runs it:
// each message enters at firstNodeIndex and follows the connection whose
// label its node emits; a label with no connection ends the message.  Only
// the node types the gift chain uses are known; any other refuses to load.
//
// Node semantics (from ThingsBoard's rule-engine-components):
//   TbMsgTypeSwitchNode     the message type's label ("RPC Request from Device")
//   TbTransformMsgNode      script(msg, metadata, msgType) -> {msg, metadata,
//                           msgType}: Success; an exception: Failure
//   TbJsFilterNode          script -> boolean: True/False; exception: Failure
//   TbChangeOriginatorNode  ENTITY source, DEVICE by name pattern ${meta} /
//                           $[data]: Success with the device as originator;
//                           no such device: Failure
//   TbSendRPCRequestNode    originator a device, data with method and params:
//                           a server-side RPC; the device's answer as data:
//                           Success; {"error":"TIMEOUT"|"NO_ACTIVE_CONNECTION"}:
//                           Failure; a malformed message: Failure
//   TbSendRPCReplyNode      requestId, serviceId, sessionId from metadata and
//                           a non-empty body: the reply to that session:
//                           Success; anything missing: Failure
// The scripts run in their JavaScript copy (the chain ships the same text for
// TBEL and JavaScript).

const MSG_TYPE_LABELS = { TO_SERVER_RPC_REQUEST: 'RPC Request from Device' };

function processPattern(pattern, metadata, data) {
  return pattern
    .replace(/\$\{([^}]+)\}/g, (_, k) => metadata[k] ?? '')
    .replace(/\$\[([^\]]+)\]/g, (_, k) => {
      let v = data;
      for (const p of k.split('.')) v = v == null ? undefined : v[p];
      return v == null ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v);
    });
}

export class RuleChain {
  // env: findDevice(name), sendRpcToDevice(device, method, params, timeoutMs,
  // done({response}|{error})), sendRpcReply(serviceId, sessionId, requestId,
  // text), hop(fn) (a queue hop), rpcTimeoutMs (override), log(...)
  constructor(json, env) {
    this.env = env;
    this.name = json.ruleChain?.name;
    const md = json.metadata;
    if (!md || !Array.isArray(md.nodes) || !Array.isArray(md.connections)) throw new Error('not a rule chain export');
    this.first = md.firstNodeIndex;
    this.next = md.nodes.map(() => ({}));
    for (const c of md.connections) (this.next[c.fromIndex][c.type] ??= []).push(c.toIndex);
    this.nodes = md.nodes.map((n, i) => this.compile(n, i));
    const rpc = this.nodes.find((n) => n.kind === 'TbSendRPCRequestNode');
    this.rpcTimeoutMs = rpc ? rpc.timeoutMs : undefined;
  }

  compile(n, i) {
    const kind = n.type.replace(/.*\./, '');
    const c = n.configuration || {};
    const node = { kind, name: n.name, index: i };
    switch (kind) {
      case 'TbMsgTypeSwitchNode':
        break;
      case 'TbTransformMsgNode':
      case 'TbJsFilterNode':
        // eslint-disable-next-line no-new-func
        node.fn = new Function('msg', 'metadata', 'msgType', c.jsScript);
        break;
      case 'TbChangeOriginatorNode':
        if (c.originatorSource !== 'ENTITY' || c.entityType !== 'DEVICE') throw new Error(`node ${n.name}: only ENTITY/DEVICE is modelled`);
        node.pattern = c.entityNamePattern;
        break;
      case 'TbSendRPCRequestNode': {
        const keys = Object.keys(c).filter((k) => k !== 'timeoutInSeconds');
        // ThingsBoard's mapper fails on unknown properties: the node would
        // never start, and nothing would reach a device.
        if (keys.length) throw new Error(`node ${n.name}: unknown configuration fields ${keys.join(', ')}: ThingsBoard would not start this node`);
        node.timeoutMs = this.env.rpcTimeoutMs ?? c.timeoutInSeconds * 1000;
        break;
      }
      case 'TbSendRPCReplyNode':
        node.attr = [c.serviceIdMetaDataAttribute, c.sessionIdMetaDataAttribute, c.requestIdMetaDataAttribute];
        break;
      default:
        throw new Error(`node ${n.name}: type ${kind} is not modelled`);
    }
    return node;
  }

  run(msg) { this.at(this.first, msg); }

  tell(node, label, msg) {
    const to = this.next[node.index][label];
    this.env.log(`chain: ${node.name} -> ${label}${to ? '' : ' (no link: message ends)'}`);
    for (const i of to || []) this.at(i, msg);
  }

  at(i, msg) {
    const node = this.nodes[i];
    const env = this.env;
    switch (node.kind) {
      case 'TbMsgTypeSwitchNode':
        return this.tell(node, MSG_TYPE_LABELS[msg.type] || 'Other', msg);
      case 'TbTransformMsgNode': {
        let r;
        try {
          r = node.fn(structuredClone(msg.data), { ...msg.metadata }, msg.type);
          if (r == null || typeof r !== 'object') throw new Error('no result');
        } catch {
          return this.tell(node, 'Failure', msg);
        }
        return this.tell(node, 'Success', { ...msg, data: r.msg ?? msg.data, metadata: r.metadata ?? msg.metadata });
      }
      case 'TbJsFilterNode': {
        let r;
        try { r = node.fn(structuredClone(msg.data), { ...msg.metadata }, msg.type); } catch {
          return this.tell(node, 'Failure', msg);
        }
        if (typeof r !== 'boolean') return this.tell(node, 'Failure', msg);
        return this.tell(node, r ? 'True' : 'False', msg);
      }
      case 'TbChangeOriginatorNode': {
        const dev = env.findDevice(processPattern(node.pattern, msg.metadata, msg.data));
        return this.tell(node, dev ? 'Success' : 'Failure', dev ? { ...msg, originator: dev } : msg);
      }
      case 'TbSendRPCRequestNode': {
        const d = msg.data;
        if (!msg.originator || d == null || typeof d !== 'object' || !('method' in d) || !('params' in d)) {
          return this.tell(node, 'Failure', msg);
        }
        // params as a string when primitive, else as JSON (as the node does)
        env.sendRpcToDevice(msg.originator, String(d.method), d.params, node.timeoutMs, (res) => {
          if (res.error) {
            this.tell(node, 'Failure', { ...msg, data: { error: res.error } });
          } else {
            let data;
            try { data = JSON.parse(res.response); } catch { data = res.response; }
            this.tell(node, 'Success', { ...msg, data: res.response === '' ? {} : data });
          }
        });
        return undefined;
      }
      case 'TbSendRPCReplyNode': {
        const [svc, ses, req] = node.attr.map((k) => msg.metadata[k]);
        const body = msg.data == null ? '' : typeof msg.data === 'string' ? msg.data : JSON.stringify(msg.data);
        if (!msg.originator || !svc || !ses || !req || body === '') return this.tell(node, 'Failure', msg);
        env.sendRpcReply(svc, ses, req, body);
        return this.tell(node, 'Success', msg);
      }
      default:
        return undefined;
    }
  }
}
