/** OHIF v3 (3.13.2) configuration for bac-node: Orthanc's DICOMweb through the same origin.
 *
 * Served in place of dist/app-config.js by deploy/ohif/nginx.conf and by `bac-node viewer`.
 * The viewer and Orthanc's /dicom-web/ come from one origin (a reverse proxy), because
 * Orthanc sends no CORS headers; the proxy forwards Host, so the BulkDataURIs Orthanc's
 * DICOMweb plugin writes point back through the proxy. What each data source option does,
 * and why these values: ../../README.md "Viewing in OHIF" and shared/viewing.md.
 */
/* A work-around for a bug of OHIF 3.13.2 (its bundled @cornerstonejs/dicom-image-loader):
 * the loader reads the VOI LUT Function as an array (`voiLUTFunction[0]`) while OHIF's
 * metadata provider gives it as a string, so 'SIGMOID' (what Hologic and other mammography
 * units write) becomes 'S', and every such image fails with "Invalid VOI LUT function".
 * This extension adds a metadata provider, ahead of OHIF's, that hands the value on as
 * a one-element array. Remove it once OHIF reads the string (check the sample study).
 */
const bacNodeVoiLutFunctionFix = {
  id: 'bac-node-voi-lut-function-fix',
  preRegistration({ extensionManager }) {
    const common = extensionManager.getModuleEntry(
      '@ohif/extension-cornerstone.utilityModule.common'
    );
    const { cornerstone } = common.exports.getCornerstoneLibraries();
    let inside = false;
    const provider = (type, ...query) => {
      if (type !== 'voiLutModule' || inside) {
        return undefined;
      }
      inside = true;
      try {
        const module = cornerstone.metaData.get(type, ...query);
        if (module && typeof module.voiLUTFunction === 'string') {
          return { ...module, voiLUTFunction: [module.voiLUTFunction] };
        }
        return module;
      } finally {
        inside = false;
      }
    };
    cornerstone.metaData.addProvider(provider, 100000);
  },
};

window.config = {
  name: 'bac-node',
  routerBasename: '/',
  extensions: [bacNodeVoiLutFunctionFix],
  modes: [],
  customizationService: {
    global: {
      // A work-around for a bug of OHIF 3.13.2: a TID 1500 measurement group without an
      // image region (bac-node's per-side and per-study summaries) makes its SR loader
      // throw ("reading 'ReferencedSOPSequence'") and the whole report fails to load.
      // Such groups are given an empty region reference, which the loader skips; the
      // per-view groups (each with its region on its MG image) load as usual.
      onBeforeSRAddMeasurement: {
        $set: ({ measurement }) => {
          if (!measurement.coords?.length) {
            measurement.coords = [{}];
          }
          return measurement;
        },
      },
    },
  },
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // bac-node's own objects say "Research use only. Not for clinical use."
  investigationalUseDialog: { option: 'never' },
  // The SR is opened without "track these measurements?" prompts.
  disableConfirmationPrompts: true,
  measurementTrackingMode: 'simplified',
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (bac-node)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
  // OHIF calls this for every image that fails to load or decode; without it, it throws.
  httpErrorHandler: error => {
    console.warn('bac-node viewer: image load failed:', error?.status ?? error?.message ?? error, error?.stack);
  },
};
