// Load a bac-node SEG or SR with dcmjs (the DICOM parser OHIF bundles) and print JSON.
//
//   node load_dicom.mjs seg SEG.dcm MG.dcm [MG.dcm ...]
//   node load_dicom.mjs sr SR.dcm
//
// seg: dcmjs's Cornerstone Segmentation adapter turns the SEG into a labelmap over the
// stack of MG images (frames matched through DerivationImageSequence, as OHIF does);
// before that, the orientation check OHIF's loader makes (viewing.md) is run.
// sr: the TID 1500 content tree is walked the way OHIF's SR SOP class handler does:
// Imaging Measurements > Measurement Group > SCOORD (+ SELECTED FROM image), NUM, CODE.
// Exit status 1 with a message on stderr when the object cannot be loaded.
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function readDataset(path) {
  const buffer = readFileSync(path);
  const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  const message = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(message.meta);
  return { dataset, arrayBuffer };
}

const asArray = (value) => (value === undefined ? [] : Array.isArray(value) ? value : [value]);
const first = (value) => asArray(value)[0];
// OHIF treats an MG image without ImageOrientationPatient as [1,0,0,0,1,0] (viewing.md).
const DEFAULT_IOP = [1, 0, 0, 0, 1, 0];

function loadSeg(segPath, sourcePaths) {
  const { dataset: seg, arrayBuffer } = readDataset(segPath);
  const sources = sourcePaths.map((path) => readDataset(path).dataset);
  const imageIds = sources.map((_, index) => `bacnode:${index}`);
  const byId = new Map(imageIds.map((id, index) => [id, sources[index]]));

  // OHIF's loader compares the SEG's plane orientation with the image's and throws
  // when the SEG has none.
  const shared = first(seg.SharedFunctionalGroupsSequence) ?? {};
  const perFrame = first(seg.PerFrameFunctionalGroupsSequence) ?? {};
  const segIop = (first(shared.PlaneOrientationSequence) ?? first(perFrame.PlaneOrientationSequence))
    ?.ImageOrientationPatient;
  if (!segIop) {
    throw new Error("SEG has no ImageOrientationPatient in a PlaneOrientationSequence");
  }
  const sourceIop = sources[0].ImageOrientationPatient ?? DEFAULT_IOP;
  if (!segIop.every((v, i) => Math.abs(Number(v) - sourceIop[i]) < 1e-3)) {
    throw new Error(`SEG orientation ${segIop} differs from the image's ${sourceIop}`);
  }

  const metadataProvider = {
    get(type, imageId) {
      const ds = byId.get(imageId);
      if (!ds) return undefined;
      const iop = ds.ImageOrientationPatient ?? DEFAULT_IOP;
      switch (type) {
        case "generalSeriesModule":
          return { seriesInstanceUID: ds.SeriesInstanceUID, studyInstanceUID: ds.StudyInstanceUID };
        case "sopCommonModule":
          return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
        case "imagePixelModule":
          return { rows: ds.Rows, columns: ds.Columns };
        case "imagePlaneModule":
          return {
            rows: ds.Rows,
            columns: ds.Columns,
            rowCosines: iop.slice(0, 3),
            columnCosines: iop.slice(3, 6),
            frameOfReferenceUID: ds.FrameOfReferenceUID,
          };
        case "instance":
          return ds;
        default:
          return undefined;
      }
    },
  };
  const state = dcmjs.adapters.Cornerstone.Segmentation.generateToolState(
    imageIds,
    arrayBuffer,
    metadataProvider,
  );
  if (!state || !state.labelmapBufferArray) {
    throw new Error("dcmjs produced no labelmap");
  }
  const labelmap = new Uint16Array(state.labelmapBufferArray[0]);
  const sliceLength = labelmap.length / imageIds.length;
  const images = sources.map((ds, index) => {
    const slice = labelmap.subarray(index * sliceLength, (index + 1) * sliceLength);
    let nonZero = 0;
    for (const value of slice) if (value) nonZero += 1;
    return { sopInstanceUID: ds.SOPInstanceUID, nonZeroPixels: nonZero };
  });
  const segments = asArray(seg.SegmentSequence).map((s) => ({
    number: s.SegmentNumber,
    label: s.SegmentLabel,
    category: first(s.SegmentedPropertyCategoryCodeSequence)?.CodeValue,
    type: first(s.SegmentedPropertyTypeCodeSequence)?.CodeValue,
    algorithmType: s.SegmentAlgorithmType,
  }));
  return {
    kind: "seg",
    rows: seg.Rows,
    columns: seg.Columns,
    numberOfFrames: Number(seg.NumberOfFrames),
    labelmapFrames: imageIds.length,
    labelmapPixelsPerFrame: sliceLength,
    images,
    segments,
  };
}

const meaning = (item) => first(item.ConceptNameCodeSequence)?.CodeMeaning;
const codeValue = (item) => first(item.ConceptNameCodeSequence)?.CodeValue;

function loadSr(srPath) {
  const { dataset: sr } = readDataset(srPath);
  const template = first(sr.ContentTemplateSequence)?.TemplateIdentifier;
  if (codeValue(sr) !== "126000" || template !== "1500") {
    throw new Error(`not a TID 1500 report: root ${codeValue(sr)}, template ${template}`);
  }
  const content = asArray(sr.ContentSequence);
  const imagingMeasurements = content.find((item) => codeValue(item) === "126010");
  if (!imagingMeasurements) throw new Error("no Imaging Measurements container");
  const groups = asArray(imagingMeasurements.ContentSequence)
    .filter((item) => codeValue(item) === "125007")
    .map((group) => {
      const items = asArray(group.ContentSequence);
      const scoords = items
        .filter((item) => item.ValueType === "SCOORD")
        .map((item) => {
          const image = asArray(item.ContentSequence).find((c) => c.ValueType === "IMAGE");
          const ref = first(image?.ReferencedSOPSequence);
          return {
            graphicType: item.GraphicType,
            points: asArray(item.GraphicData).length / 2,
            referencedSOPInstanceUID: ref?.ReferencedSOPInstanceUID,
          };
        });
      const numbers = items
        .filter((item) => item.ValueType === "NUM")
        .map((item) => {
          const measured = first(item.MeasuredValueSequence);
          return {
            name: meaning(item),
            value: Number(measured?.NumericValue),
            unit: first(measured?.MeasurementUnitsCodeSequence)?.CodeValue,
          };
        });
      const codes = items
        .filter((item) => item.ValueType === "CODE")
        .map((item) => ({ name: meaning(item), value: first(item.ConceptCodeSequence)?.CodeMeaning }));
      const tracking = items.find((item) => meaning(item) === "Tracking Identifier");
      return { trackingIdentifier: tracking?.TextValue, scoords, numbers, codes };
    });
  const texts = [];
  const walk = (items) => {
    for (const item of asArray(items)) {
      if (item.ValueType === "TEXT") texts.push(item.TextValue);
      walk(item.ContentSequence);
    }
  };
  walk(sr.ContentSequence);
  const evidence = asArray(sr.CurrentRequestedProcedureEvidenceSequence).flatMap((study) =>
    asArray(study.ReferencedSeriesSequence).flatMap((series) =>
      asArray(series.ReferencedSOPSequence).map((sop) => sop.ReferencedSOPInstanceUID),
    ),
  );
  return {
    kind: "sr",
    sopClassUID: sr.SOPClassUID,
    seriesDescription: sr.SeriesDescription,
    groups,
    texts,
    evidence,
  };
}

try {
  const [kind, path, ...rest] = process.argv.slice(2);
  let result;
  if (kind === "seg") result = loadSeg(path, rest);
  else if (kind === "sr") result = loadSr(path);
  else throw new Error("usage: load_dicom.mjs seg SEG.dcm MG.dcm... | sr SR.dcm");
  process.stdout.write(`${JSON.stringify(result)}\n`);
} catch (error) {
  process.stderr.write(`load_dicom: ${error.stack ?? error}\n`);
  process.exit(1);
}
