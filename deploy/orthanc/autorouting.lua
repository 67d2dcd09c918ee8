-- bac-node auto-routing for Orthanc: each stable study's MG series go to bac-node.
--
-- Orthanc calls OnStableStudy once no instance of the study has arrived for StableAge
-- seconds. The MG series (and only they: the SEG and SR that bac-node sends back are not
-- MG) are sent to the DicomModalities entry "bacnode" as an asynchronous Orthanc job.
-- The number of MG instances sent is kept in the study's metadata "BacNodeRouted"
-- (declared in UserMetadata), so the results coming back, which make the study stable
-- again, do not send it a second time; a study that later gets more MG images is sent
-- again (bac-node analyses it anew because its inputs changed).

local MODALITY = 'bacnode'
local ROUTED = 'BacNodeRouted'

function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local mg = {}
  local count = 0
  for _, s in ipairs(series) do
    if s['MainDicomTags']['Modality'] == 'MG' then
      table.insert(mg, s['ID'])
      count = count + #s['Instances']
    end
  end
  if count == 0 then
    return
  end
  local sent = tonumber(metadata[ROUTED] or '0') or 0
  if count <= sent then
    return
  end
  print('bac-node: sending ' .. count .. ' MG instance(s) of study ' .. studyId ..
        ' to ' .. MODALITY)
  RestApiPost('/modalities/' .. MODALITY .. '/store',
              DumpJson({ Resources = mg, Asynchronous = true }, true))
  RestApiPut('/studies/' .. studyId .. '/metadata/' .. ROUTED, tostring(count))
end
