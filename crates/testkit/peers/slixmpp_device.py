"""A device built on slixmpp, a client Pushgate did not write.

Usage: slixmpp_device.py JID PASSWORD HOST PORT CA_FILE COUNT

Connects with STARTTLS (verifying the server against CA_FILE), authenticates (slixmpp picks
SCRAM-SHA-256, the strongest mechanism offered), binds, enables XEP-0198 stream management,
and for each of COUNT chat messages: prints it as a JSON line, sends an XEP-0184 receipt, an
XEP-0333 displayed marker and an XEP-0461 reply. Prints {"ready": ...} once the session is up
and {"done": true} at the end. Exits non-zero on any failure, with the reason on stderr.
"""

import asyncio
import json
import sys

import slixmpp
from slixmpp.xmlstream import ET


def emit(obj):
    print(json.dumps(obj), flush=True)


class Device(slixmpp.ClientXMPP):
    def __init__(self, jid, password, count):
        super().__init__(jid, password)
        self.count = count
        self.seen = 0
        self.failed = None
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0184")
        self.register_plugin("xep_0198")
        self.register_plugin("xep_0199")
        self.register_plugin("xep_0333")
        # receipts are sent explicitly below, after the message was handled
        self.plugin["xep_0184"].auto_ack = False
        self.plugin["xep_0198"].allow_resume = False
        self.add_event_handler("session_start", self.on_start)
        self.add_event_handler("message", self.on_message)
        self.add_event_handler("failed_auth", self.on_failed_auth)
        self.add_event_handler("sm_enabled", self.on_sm_enabled)
        self.sm_enabled = False

    def on_failed_auth(self, _event):
        self.failed = "authentication failed"
        sys.stderr.write("authentication failed\n")
        self.disconnect()

    def on_sm_enabled(self, _event):
        self.sm_enabled = True

    async def on_start(self, _event):
        self.send_presence()
        mech = self.plugin["feature_mechanisms"].mech
        emit({"ready": True, "mechanism": mech.name if mech else None, "jid": str(self.boundjid)})

    def on_message(self, msg):
        if msg["type"] not in ("chat", "normal") or not msg["body"]:
            return
        mid = msg["id"]
        emit({
            "id": mid,
            "body": msg["body"],
            "subject": msg["subject"],
            "wants_receipt": bool(msg["request_receipt"]),
            "sm_enabled": self.sm_enabled,
        })
        receipt = self.Message()
        receipt["to"] = msg["from"]
        receipt["receipt"] = mid
        receipt.send()
        marker = self.Message()
        marker["to"] = msg["from"]
        marker["displayed"]["id"] = mid
        marker.send()
        reply = self.make_message(mto=msg["from"], mbody="ack from slixmpp", mtype="chat")
        el = ET.Element("{urn:xmpp:reply:0}reply")
        el.set("id", mid)
        reply.append(el)
        reply.send()
        self.seen += 1
        if self.seen >= self.count:
            asyncio.get_event_loop().call_later(1.0, self.finish)

    def finish(self):
        emit({"done": True})
        self.disconnect()


def main():
    jid, password, host, port, ca, count = sys.argv[1:7]
    dev = Device(jid, password, int(count))
    dev.ca_certs = ca
    dev.connect(host=host, port=int(port))
    loop = asyncio.get_event_loop()
    loop.run_until_complete(dev.disconnected)
    if dev.failed or dev.seen < dev.count:
        sys.stderr.write(f"ended early: {dev.failed or 'disconnected'}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
