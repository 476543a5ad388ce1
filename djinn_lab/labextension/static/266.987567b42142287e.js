"use strict";(self.rspackChunkdjinn_lab=self.rspackChunkdjinn_lab||[]).push([[266],{646(r,n,e){var o=e(601),t=e.n(o),a=e(314),i=(e.n(a))()(t());i.push([r.id,`/* Theme variables only, so the light and the dark theme are both readable. */
.djinn-sidebar {
  padding: 8px 12px;
  overflow-y: auto;
  background: var(--jp-layout-color1);
  color: var(--jp-ui-font-color1);
  font-size: var(--jp-ui-font-size1);
  min-width: 280px;
}
.djinn-sidebar h2 { font-size: var(--jp-ui-font-size3); margin: 4px 0; }
.djinn-sidebar h3 { font-size: var(--jp-ui-font-size2); margin: 12px 0 4px; border-bottom: 1px solid var(--jp-border-color2); }
.djinn-sidebar h4 { font-size: var(--jp-ui-font-size1); margin: 8px 0 2px; }
.djinn-row { display: flex; gap: 6px; justify-content: space-between; align-items: center; margin: 2px 0; }
.djinn-muted { color: var(--jp-ui-font-color2); }
.djinn-warn, .djinn-note { color: var(--jp-warn-color0); }
.djinn-error { color: var(--jp-error-color1); margin-top: 6px; white-space: pre-wrap; }
.djinn-bar { position: relative; height: 10px; background: var(--jp-layout-color3); border-radius: 3px; margin: 2px 0 4px; }
.djinn-bar-used, .djinn-bar-djinn { position: absolute; left: 0; top: 0; height: 100%; border-radius: 3px; }
.djinn-bar-used { background: var(--jp-brand-color3); }
.djinn-bar-djinn { background: var(--jp-brand-color1); }
.djinn-session { display: grid; grid-template-columns: 56px 1fr; gap: 0 6px; padding: 3px 0; border-bottom: 1px dotted var(--jp-border-color2); }
.djinn-session > span:nth-child(n + 3) { grid-column: 2; }
.djinn-state { font-weight: bold; }
.djinn-session[data-state='paused'] .djinn-state { color: var(--jp-warn-color0); }
.djinn-session[data-state='running'] .djinn-state { color: var(--jp-success-color0); }
.djinn-session[data-state='paged'] .djinn-state { color: var(--jp-info-color0); }
.djinn-link { color: var(--jp-content-link-color); cursor: pointer; text-decoration: underline; grid-column: 2; }
.djinn-pause { margin: 6px 0; padding: 4px; background: var(--jp-layout-color2); border-radius: 3px; }
.djinn-controls { display: flex; gap: 4px; flex-wrap: wrap; }
.djinn-sidebar button {
  background: var(--jp-layout-color2);
  color: var(--jp-ui-font-color1);
  border: 1px solid var(--jp-border-color1);
  border-radius: 3px;
  padding: 2px 8px;
  cursor: pointer;
}
.djinn-sidebar button:disabled { color: var(--jp-ui-font-color3); cursor: default; }
.djinn-sidebar input { background: var(--jp-input-background); color: var(--jp-ui-font-color1); border: 1px solid var(--jp-border-color1); }
.djinn-layer { width: 70px; }
`,""]),e.d(n,{},{A:i})},314(r){r.exports=function(r){var n=[];return n.toString=function(){return this.map(function(n){var e="",o=void 0!==n[5];return n[4]&&(e+="@supports (".concat(n[4],") {")),n[2]&&(e+="@media ".concat(n[2]," {")),o&&(e+="@layer".concat(n[5].length>0?" ".concat(n[5]):""," {")),e+=r(n),o&&(e+="}"),n[2]&&(e+="}"),n[4]&&(e+="}"),e}).join("")},n.i=function(r,e,o,t,a){"string"==typeof r&&(r=[[null,r,void 0]]);var i={};if(o)for(var s=0;s<this.length;s++){var d=this[s][0];null!=d&&(i[d]=!0)}for(var c=0;c<r.length;c++){var p=[].concat(r[c]);o&&i[p[0]]||(void 0!==a&&(void 0===p[5]||(p[1]="@layer".concat(p[5].length>0?" ".concat(p[5]):""," {").concat(p[1],"}")),p[5]=a),e&&(p[2]&&(p[1]="@media ".concat(p[2]," {").concat(p[1],"}")),p[2]=e),t&&(p[4]?(p[1]="@supports (".concat(p[4],") {").concat(p[1],"}"),p[4]=t):p[4]="".concat(t)),n.push(p))}},n}},601(r){r.exports=function(r){return r[1]}},665(r,n,e){e.r(n);var o=e(72),t=e.n(o),a=e(825),i=e.n(a),s=e(659),d=e.n(s),c=e(56),p=e.n(c),l=e(540),u=e.n(l),f=e(113),v=e.n(f),j=e(646),b={};b.styleTagTransform=v(),b.setAttributes=p(),b.insert=d().bind(null,"head"),b.domAPI=i(),b.insertStyleElement=u(),t()(j.A,b);let h=j.A&&j.A.locals?j.A.locals:void 0;e.d(n,{},{default:h})},72(r){var n=[];function e(r){for(var e=-1,o=0;o<n.length;o++)if(n[o].identifier===r){e=o;break}return e}function o(r,o){for(var t={},a=[],i=0;i<r.length;i++){var s=r[i],d=o.base?s[0]+o.base:s[0],c=t[d]||0,p="".concat(d," ").concat(c);t[d]=c+1;var l=e(p),u={css:s[1],media:s[2],sourceMap:s[3],supports:s[4],layer:s[5]};if(-1!==l)n[l].references++,n[l].updater(u);else{var f=function(r,n){var e=n.domAPI(n);return e.update(r),function(n){n?(n.css!==r.css||n.media!==r.media||n.sourceMap!==r.sourceMap||n.supports!==r.supports||n.layer!==r.layer)&&e.update(r=n):e.remove()}}(u,o);o.byIndex=i,n.splice(i,0,{identifier:p,updater:f,references:1})}a.push(p)}return a}r.exports=function(r,t){var a=o(r=r||[],t=t||{});return function(r){r=r||[];for(var i=0;i<a.length;i++){var s=e(a[i]);n[s].references--}for(var d=o(r,t),c=0;c<a.length;c++){var p=e(a[c]);0===n[p].references&&(n[p].updater(),n.splice(p,1))}a=d}}},659(r){var n={};r.exports=function(r,e){var o=function(r){if(void 0===n[r]){var e=document.querySelector(r);if(window.HTMLIFrameElement&&e instanceof window.HTMLIFrameElement)try{e=e.contentDocument.head}catch(r){e=null}n[r]=e}return n[r]}(r);if(!o)throw Error("Couldn't find a style target. This probably means that the value for the 'insert' parameter is invalid.");o.appendChild(e)}},540(r){r.exports=function(r){var n=document.createElement("style");return r.setAttributes(n,r.attributes),r.insert(n,r.options),n}},56(r,n,e){r.exports=function(r){var n=e.nc;n&&r.setAttribute("nonce",n)}},825(r){r.exports=function(r){if("u"<typeof document)return{update:function(){},remove:function(){}};var n=r.insertStyleElement(r);return{update:function(e){var o,t,a;o="",e.supports&&(o+="@supports (".concat(e.supports,") {")),e.media&&(o+="@media ".concat(e.media," {")),(t=void 0!==e.layer)&&(o+="@layer".concat(e.layer.length>0?" ".concat(e.layer):""," {")),o+=e.css,t&&(o+="}"),e.media&&(o+="}"),e.supports&&(o+="}"),(a=e.sourceMap)&&"u">typeof btoa&&(o+="\n/*# sourceMappingURL=data:application/json;base64,".concat(btoa(unescape(encodeURIComponent(JSON.stringify(a))))," */")),r.styleTagTransform(o,n,r.options)},remove:function(){var r;null===(r=n).parentNode||r.parentNode.removeChild(r)}}}},113(r){r.exports=function(r,n){if(n.styleSheet)n.styleSheet.cssText=r;else{for(;n.firstChild;)n.removeChild(n.firstChild);n.appendChild(document.createTextNode(r))}}}}]);