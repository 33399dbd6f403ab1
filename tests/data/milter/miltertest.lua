-- Driven by tests/test_milter_badinput.py::test_miltertest_drives_the_same_cases (filterd's tests,
-- MIT like filterd). MILTER_SOCK is the milter socket, e.g. inet:12345@127.0.0.1.
local sock = os.getenv("MILTER_SOCK")
local GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

local function session(rcpts, body, subject)
  local conn = mt.connect(sock, 20, 0.25)
  if conn == nil then error("mt.connect() failed") end
  mt.negotiate(conn, nil, nil, nil)
  if mt.conninfo(conn, "client.example", "192.0.2.10") ~= nil then error("conninfo failed") end
  if mt.helo(conn, "client.example") ~= nil then error("helo failed") end
  mt.macro(conn, SMFIC_MAIL, "i", "MTQID1")
  if mt.mailfrom(conn, "<alice@example.com>") ~= nil then error("mailfrom failed") end
  for _, r in ipairs(rcpts) do
    if mt.rcptto(conn, r) ~= nil then error("rcptto failed") end
  end
  mt.header(conn, "From", "Alice <alice@example.com>")
  mt.header(conn, "To", "bob@example.org")
  mt.header(conn, "Subject", subject)
  mt.header(conn, "Message-ID", "<" .. subject .. "@example.com>")
  -- end of headers: miltertest sends it only when the filter asked for it
  mt.bodystring(conn, body)
  if mt.eom(conn) ~= nil then error("eom failed") end
  return conn
end

-- clean message: accepted, spam headers inserted
local c = session({"<bob@example.org>"}, "Hello Bob\r\n", "mt-clean")
if mt.getreply(c) ~= SMFIR_CONTINUE and mt.getreply(c) ~= SMFIR_ACCEPT then
  mt.echo("clean: unexpected reply " .. mt.getreply(c))
  error("clean: unexpected reply")
end
if not mt.eom_check(c, MT_HDRINSERT, "X-Spam-Status") then error("clean: no X-Spam-Status") end
mt.disconnect(c)

-- GTUBE: rejected with filterd's own reply code (miltertest 2.11 cannot show the text; the
-- Postfix test checks it)
c = session({"<bob@example.org>"}, "spam " .. GTUBE .. "\r\n", "mt-gtube")
if mt.getreply(c) ~= SMFIR_REPLYCODE then error("gtube: expected a reply code") end
if mt.eom_check(c, MT_HDRINSERT) then error("gtube: headers added to a rejected message") end
mt.disconnect(c)

-- per-recipient outcomes: strict@ is removed, ok@ stays
c = session({"<ok@example.org>", "<strict@example.org>"}, "milter-split-marker\r\n", "mt-split")
if not mt.eom_check(c, MT_RCPTDELETE, "<strict@example.org>") then error("split: strict@ not removed") end
if mt.eom_check(c, MT_RCPTDELETE, "<ok@example.org>") then error("split: ok@ removed") end
mt.disconnect(c)

-- quarantine: MTA hold
c = session({"<bob@example.org>"}, "milter-hold-marker\r\n", "mt-hold")
if not mt.eom_check(c, MT_QUARANTINE) then error("hold: no quarantine request") end
mt.disconnect(c)

mt.echo("miltertest: all cases passed")
