"""Lua shared by the profile step (``APPLY_EVENT``) and the merge fold (``FOLD``).

Redis runs each script atomically on one hash slot (the profile's). Both scripts
start with :data:`FUNCTIONS`, so a trait, a computed field or a history entry is
merged by the same code whether it comes from an event or from a folded profile.

Value formats (see docs/state-layout.md):

* trait and consent values, history entries: ``"<event ms>|<JSON>"``; the event
  time decides which value is the latest;
* ``first:``/``last:``: the JSON value, and its event time in ``atfirst:``/``atlast:``
  (the fold gets them joined as ``"<event ms>|<JSON>"``);
* ``add:``, ``min:``, ``max:``: a number (15 significant digits);
* ``set:``: values joined by the ASCII unit separator (``\\31``);
* ``win:``: ``"<bucket>=<amount>;..."``, bucket = event ms // bucket size.
"""

FUNCTIONS = r"""
local SEP = '\31'
local OTHER = '(other)'

local function ts_of(value)
  return tonumber(string.match(value, '^(-?%d+)|'))
end

local function fmt(number)
  if number == math.floor(number) and math.abs(number) < 2^53 then return string.format('%d', number) end
  return string.format('%.17g', number)
end

local function count_of(list)
  local _, n = string.gsub(list, SEP, '')
  return n + 1
end

local function has(list, value)
  return string.find(SEP .. list .. SEP, SEP .. value .. SEP, 1, true) ~= nil
end

-- The field of a grouped value: at most `limit` groups per field, the rest in OTHER.
-- Only a new group pays for counting the existing ones (HKEYS).
local function admit(h, field, group, limit)
  if group == '' then return field end
  local grouped = field .. '|' .. group
  if redis.call('HEXISTS', h, grouped) == 1 then return grouped end
  local prefix = field .. '|'
  local n = 0
  for _, name in ipairs(redis.call('HKEYS', h)) do
    if string.sub(name, 1, #prefix) == prefix then n = n + 1 end
  end
  if n >= tonumber(limit) then return prefix .. OTHER end
  return grouped
end

-- Add to a stored number; 15 significant digits keep decimal amounts short and exact-looking.
local function add_number(h, field, amount)
  local held = redis.call('HGET', h, field)
  local total = (held and tonumber(held) or 0) + tonumber(amount)
  if total == math.floor(total) and math.abs(total) < 2^53 then
    redis.call('HSET', h, field, string.format('%d', total))
  else
    redis.call('HSET', h, field, string.format('%.15g', total))
  end
end

-- Keep the value with the later event time (ties: the one applied later).
local function set_latest(h, field, value)
  local held = redis.call('HGET', h, field)
  if (not held) or ts_of(value) >= ts_of(held) then redis.call('HSET', h, field, value) end
end

-- first:/last: computed values: the JSON in `field`, its event time in 'at' .. field
-- (apart, so that a value of up to 64 bytes keeps the hash compact).
local function keep_by_time(h, field, value, later)
  local ts, json = string.match(value, '^(-?%d+)|(.*)$')
  local at_field = 'at' .. field
  local held = redis.call('HGET', h, at_field)
  local t = tonumber(ts)
  if (not held) or (later and t >= tonumber(held)) or ((not later) and t < tonumber(held)) then
    redis.call('HSET', h, field, json, at_field, ts)
  end
end

local function keep_extreme(h, field, value, smaller)
  local held = redis.call('HGET', h, field)
  local v = tonumber(value)
  if (not held) or (smaller and v < tonumber(held)) or ((not smaller) and v > tonumber(held)) then
    redis.call('HSET', h, field, value)
  end
end

local function add_to_set(h, field, value, limit)
  local held = redis.call('HGET', h, field)
  if not held then redis.call('HSET', h, field, value); return end
  if has(held, value) or count_of(held) >= limit then return end
  redis.call('HSET', h, field, held .. SEP .. value)
end

local function window_parse(raw)
  local out = {}
  if raw then
    for bucket, amount in string.gmatch(raw, '(-?%d+)=([^;]+)') do out[#out + 1] = {tonumber(bucket), tonumber(amount)} end
  end
  return out
end

-- Buckets older than `keep` buckets before the newest can fall in no window again.
local function window_write(h, field, list, keep)
  table.sort(list, function(a, b) return a[1] < b[1] end)
  local newest = list[#list][1]
  local parts = {}
  for _, entry in ipairs(list) do
    if entry[1] > newest - keep then parts[#parts + 1] = entry[1] .. '=' .. fmt(entry[2]) end
  end
  redis.call('HSET', h, field, table.concat(parts, ';'))
end

local function window_add(h, field, bucket, keep, amount)
  local raw = redis.call('HGET', h, field)
  if not raw then
    redis.call('HSET', h, field, bucket .. '=' .. fmt(amount))
    return
  end
  -- The usual cases touch only the newest bucket, the last entry: add to it, or
  -- append a newer one (dropping old ones from the front only when there are any).
  local head, last_bucket, last_amount = string.match(raw, '^(.-)(-?%d+)=([^;]+)$')
  local newest = tonumber(last_bucket)
  if newest and bucket == newest then
    redis.call('HSET', h, field, head .. last_bucket .. '=' .. fmt(tonumber(last_amount) + amount))
    return
  end
  if newest and bucket > newest then
    local grown = raw .. ';' .. bucket .. '=' .. fmt(amount)
    local oldest = tonumber(string.match(grown, '^(-?%d+)='))
    if oldest > bucket - keep then
      redis.call('HSET', h, field, grown)
    else
      window_write(h, field, window_parse(grown), keep)
    end
    return
  end
  -- A late event: the whole list.
  local list = window_parse(raw)
  for _, entry in ipairs(list) do if entry[1] > newest then newest = entry[1] end end
  if bucket <= newest - keep then return end
  local found = false
  for _, entry in ipairs(list) do
    if entry[1] == bucket then entry[2] = entry[2] + amount; found = true end
  end
  if not found then list[#list + 1] = {bucket, amount} end
  window_write(h, field, list, keep)
end

-- One computed-trait operation of an event (agents/profiles/computed.py plans them).
local function apply_op(h, op, field, group, value, extra)
  if op == 'add' then
    add_number(h, admit(h, field, group, extra), value)
  elseif op == 'min' or op == 'max' then
    keep_extreme(h, admit(h, field, group, extra), value, op == 'min')
  elseif op == 'last' or op == 'first' then
    keep_by_time(h, admit(h, field, group, extra), value, op == 'last')
  elseif op == 'set' then
    add_to_set(h, field, value, tonumber(extra))
  elseif op == 'win' then
    local bucket, keep = string.match(extra, '^(-?%d+),(%d+)$')
    window_add(h, field, tonumber(bucket), tonumber(keep), tonumber(value))
  end
end

-- A stored computed field of an absorbed profile, merged into the survivor's.
local function merge_computed(h, field, value)
  local kind = string.match(field, '^(%a+):')
  if kind == 'add' then
    add_number(h, field, value)
  elseif kind == 'min' or kind == 'max' then
    keep_extreme(h, field, value, kind == 'min')
  elseif kind == 'last' or kind == 'first' then
    keep_by_time(h, field, value, kind == 'last')
  elseif kind == 'set' then
    for item in string.gmatch(value, '[^' .. SEP .. ']+') do add_to_set(h, field, item, 1000) end
  elseif kind == 'win' then
    local list = window_parse(redis.call('HGET', h, field))
    for _, entry in ipairs(window_parse(value)) do
      local found = false
      for _, mine in ipairs(list) do
        if mine[1] == entry[1] then mine[2] = mine[2] + entry[2]; found = true end
      end
      if not found then list[#list + 1] = entry end
    end
    if #list > 0 then window_write(h, field, list, math.huge) end
  else
    redis.call('HSETNX', h, field, value)
  end
end

-- History: newest event time first, at most `limit` entries.
local function history_insert(key, entry, limit)
  if limit <= 0 then return end
  local ts = ts_of(entry)
  local head = redis.call('LINDEX', key, 0)
  if (not head) or ts >= ts_of(head) then
    redis.call('LPUSH', key, entry)
  else
    local items = redis.call('LRANGE', key, 0, limit - 1)
    local placed = false
    for _, item in ipairs(items) do
      if item == entry then return end
      if ts >= ts_of(item) then
        redis.call('LINSERT', key, 'BEFORE', item, entry)
        placed = true
        break
      end
    end
    if not placed then
      if #items >= limit then return end
      redis.call('RPUSH', key, entry)
    end
  end
  redis.call('LTRIM', key, 0, limit - 1)
end

-- Drop de-duplication records received before `cutoff` (ms).
local function sweep_seen(key, cutoff)
  local all = redis.call('HGETALL', key)
  local stale = {}
  for i = 1, #all, 2 do
    local at = tonumber(string.match(all[i + 1], '^[^|]*|(%d+)'))
    if at and at < cutoff then stale[#stale + 1] = all[i] end
    if #stale >= 1000 then redis.call('HDEL', key, unpack(stale)); stale = {} end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
end
"""
