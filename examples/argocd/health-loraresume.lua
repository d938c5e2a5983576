-- Argo CD health check for loraresume.dev/LoraResume (install: argocd-cm-patch.yaml).
-- Argo CD passes the live object as `obj`; the script returns {status = ..., message = ...}.
--   no status yet                       -> Progressing  "Waiting for the operator"
--   status older than the spec          -> Progressing  (observedGeneration < metadata.generation)
--   Pending / Running / Resuming        -> Progressing  phase, step/maxSteps, attempt, preemptions
--   Suspended                           -> Suspended    spec.suspend, and where it resumes from
--   Succeeded                           -> Healthy      the adapter's location
--   Failed                              -> Degraded     status.message (why, and what to change)
-- Written for Lua 5.1 (Argo CD's gopher-lua), where every JSON number is a float.
local hs = {}

local function count(value)
  if type(value) ~= "number" then
    return "0"
  end
  return string.format("%d", math.floor(value))
end

local function plural(value, word)
  local text = count(value)
  if text == "1" then
    return text .. " " .. word
  end
  return text .. " " .. word .. "s"
end

local status = obj.status
if status == nil or status.phase == nil or status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
if type(generation) == "number" and (type(observed) ~= "number" or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. count(generation) ..
    " (status is for generation " .. count(observed) .. ")"
  return hs
end

local message = status.message
if message == nil then
  message = ""
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  if message ~= "" then
    hs.message = message
  elseif status.outputAdapter ~= nil then
    hs.message = "adapter saved to " .. status.outputAdapter
  else
    hs.message = "Succeeded"
  end
  return hs
end

-- Suspended and Failed: the operator's message says where it resumes from, or what to change.
local settled = {Suspended = "Suspended", Failed = "Degraded"}
if settled[status.phase] ~= nil then
  hs.status = settled[status.phase]
  if message ~= "" then
    hs.message = message
  else
    hs.message = status.phase
  end
  return hs
end

if status.phase == "Pending" or status.phase == "Running" or status.phase == "Resuming" then
  hs.status = "Progressing"
  local progress = status.progress
  if progress == nil or progress == "" then
    progress = count(status.step) .. "/" .. count(status.maxSteps)
  end
  hs.message = status.phase .. ": step " .. progress .. ", attempt " .. count(status.attempt) .. ", " ..
    plural(status.preemptions, "preemption") .. ", " .. plural(status.failures, "failure")
  if message ~= "" then
    hs.message = hs.message .. " - " .. message
  end
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(status.phase)
return hs
